"""What an image name and a sha512 digest look like: shared by the config checks and the library,
in a module light enough for every command's start-up (``vibatch exec`` loads the config)."""
from __future__ import annotations

import re
from typing import Any

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA512 = re.compile(r"^[0-9a-f]{128}$")


def valid_name(name: Any) -> bool:
    """An image name (or alias): letters, digits and . _ + -, at most 64, no leading dot."""
    return isinstance(name, str) and bool(_NAME.match(name))


def valid_sha512(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA512.match(value))
