"""The VM: the domain XML (``domain``), libvirt-python calls (``hypervisor``), the guest agents
(``agent``), the guest's setup script (``guestsetup``), KVM/TCG detection (``accel``) and the
shared folders served as the job's user (``share``, also libvirt's virtiofsd launcher).

May import: ``vibatch.config``, ``errors``, ``names``, ``util``, ``safeio``, ``proc``. Never the
job core, the image library, the batch adapters or the commands.
"""
