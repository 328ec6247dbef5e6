"""The commands an admin or a user types: ``vibatch`` itself (``cli``), the image library's
subcommands (``admin``) and ``vibatch image test`` (``imagetest``).

May import everything below it: the batch adapters (``vibatch.batch``, for their image-offer
formats and their answer to "does this job still exist"), the job core, the VM layer, the image
library and the base. Nothing imports the commands.
"""
