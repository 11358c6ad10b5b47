"""Errors of the VM driver: platform assets, root file systems and boots."""


class VmError(Exception):
    """Root of every error raised by the VM driver."""


class VmAssetsError(VmError):
    """The shared kernel and initramfs could not be fetched or built."""


class VmConfigError(VmError):
    """The image's config or the VM's settings cannot make a bootable VM."""


class InvalidVmHandleError(VmError):
    """A stored VM handle could not be read back."""


class RootfsImageError(VmError):
    """The image's root file system could not be turned into a disk."""


class BootFailedError(VmError):
    """The App VM stopped or stayed silent before its port answered."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(f"{message}\n--- console ---\n{console_tail}".rstrip())
        self.console_tail = console_tail


class BootTimedOutError(BootFailedError):
    """The App VM kept running but its port did not answer in time."""


class HostPortInUseError(BootFailedError):
    """QEMU could not listen on the host port chosen for the forward."""


class AppExitedError(BootFailedError):
    """The image's command ended before its port answered."""

    def __init__(self, message: str, console_tail: str, exit_code: int) -> None:
        super().__init__(message, console_tail)
        self.exit_code = exit_code


class GuestPanickedError(BootFailedError):
    """The guest kernel panicked."""
