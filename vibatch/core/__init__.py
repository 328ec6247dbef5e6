"""The job core, neutral to batch systems: a job's life on a node (``lifecycle``: prologue,
epilogue, reap), its durable record (``jobstore``), its directories (``jobdir``), the node's
CPU and memory slots (``slots``, ``node``), the job request (``request``), disk admission
(``disk``), accounting (``accounting``), running a command in the job's VM (``execjob``) and the
test-only fault points (``faultpoints``).

May import: the VM layer (``vibatch.vm``), the image library (``vibatch.images``) and the base
(``config``, ``errors``, ``names``, ``util``, ``safeio``, ``proc``, ``hygiene``). Never a batch
adapter or a command: batch systems reach the core through its functions and ports
(``lifecycle.Node``).
"""
