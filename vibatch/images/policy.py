"""Which image a job gets: the site's policy over the library.

A job names an image or an OS (or nothing). ``resolve`` tries, in order:

1. an exact image name in the library;
2. an OS alias (``images.aliases``: ``el9: alma9-2026.11``);
3. with nothing requested, the queue's default (``images.queue_defaults``), then the site default
   (``images.default``); a default may itself be an alias;
4. then the checks: the site's block list, a quarantined version, an expired endorsement, and the
   allow-lists of the user's groups and account.

Every refusal is the job's fault (exit code 11) and its message lists what this user may ask for.
"""
from __future__ import annotations

import grp
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import Config
from ..errors import ImageNotAllowed, LibraryError, UnknownImage
from .library import Image, Library, check_name


@dataclass(frozen=True)
class Resolution:
    image: Image
    how: str          # "image", "alias", "queue default", "site default"
    requested: Optional[str]


def user_groups(user: str, gid: int) -> list[str]:
    names = []
    for g in os.getgrouplist(user, gid):
        try:
            names.append(grp.getgrgid(g).gr_name)
        except KeyError:
            continue
    return names


def allow_list(cfg: Config, groups: Sequence[str], account: Optional[str]) -> Optional[set[str]]:
    """The names this user may use, or None when no allow-list applies to them."""
    lists = [cfg.images.allow_groups[g] for g in groups if g in cfg.images.allow_groups]
    if account and cfg.images.accounts_enforced and account in cfg.images.allow_accounts:
        lists.append(cfg.images.allow_accounts[account])
    if not lists:
        return None
    return {name for lst in lists for name in lst}


def _target(cfg: Config, name: str) -> str:
    return cfg.images.aliases.get(name, name)


def refusal(cfg: Config, library: Library, image: Image, now: Optional[float] = None) -> str:
    """Why no job may use this image right now ("" if it is usable)."""
    now = time.time() if now is None else now
    blocked = set(cfg.images.blocked)
    if image.name in blocked or image.digest in blocked:
        return "blocked by the site (images.blocked)"
    q = library.quarantined(image)
    if q:
        return f"quarantined on this node ({q['reason']})"
    prov = image.provenance or {}
    if prov.get("expires_at") is not None and prov["expires_at"] < now:
        return (f"its endorsement expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(prov['expires_at']))} "
                "(the catalog has not been synced since)")
    return ""


def offer(cfg: Config, library: Library, groups: Sequence[str] = (),
          account: Optional[str] = None) -> list[str]:
    """What this user may ask for: usable image names and the aliases that lead to them."""
    allowed = allow_list(cfg, groups, account)
    usable = set()
    for image in library.images():
        if refusal(cfg, library, image):
            continue
        if allowed is not None and not _allowed(cfg, image, allowed):
            continue
        usable.add(image.name)
    names = sorted(usable)
    aliases = sorted(a for a, t in cfg.images.aliases.items() if t in usable and
                     (allowed is None or a in allowed or t in allowed))
    return aliases + names


def _allowed(cfg: Config, image: Image, allowed: set[str]) -> bool:
    return image.name in allowed or any(_target(cfg, a) == image.name for a in allowed)


def _describe(choices: list[str]) -> str:
    return ", ".join(choices) if choices else "nothing: no image is available to you on this node"


def resolve(cfg: Config, library: Library, requested: Optional[str], *,
            queue: Optional[str] = None, groups: Sequence[str] = (),
            account: Optional[str] = None, now: Optional[float] = None) -> Resolution:
    requested = (requested or "").strip() or None
    if requested is not None:
        try:
            check_name(requested)
        except UnknownImage:
            raise UnknownImage(f"invalid image or OS name {requested!r}; you may ask for: "
                               f"{_describe(offer(cfg, library, groups, account))}") from None
        names = set(library.names())
        if requested in names:
            name, how = requested, "image"
        elif requested in cfg.images.aliases:
            name, how = cfg.images.aliases[requested], "alias"
        else:
            raise UnknownImage(f"unknown image or OS {requested!r}; you may ask for: "
                               f"{_describe(offer(cfg, library, groups, account))}")
    elif queue and queue in cfg.images.queue_defaults:
        name, how = _target(cfg, cfg.images.queue_defaults[queue]), "queue default"
    elif cfg.images.default:
        name, how = _target(cfg, cfg.images.default), "site default"
    else:
        raise UnknownImage("this job names no image or OS and the site sets no default; you may "
                           f"ask for: {_describe(offer(cfg, library, groups, account))}")
    try:
        image = library.get(name)
    except (UnknownImage, LibraryError):
        what = f"{how} {requested or cfg.images.queue_defaults.get(queue or '', cfg.images.default)!r}"
        raise UnknownImage(f"the {what} leads to image {name!r}, which is not installed on this "
                           f"node; you may ask for: {_describe(offer(cfg, library, groups, account))}"
                           ) from None
    why = refusal(cfg, library, image, now)
    if why:
        raise ImageNotAllowed(f"image {image.name!r} cannot be used: {why}; you may ask for: "
                              f"{_describe(offer(cfg, library, groups, account))}")
    allowed = allow_list(cfg, groups, account)
    if allowed is not None and not _allowed(cfg, image, allowed):
        raise ImageNotAllowed(f"image {image.name!r} is not allowed for your groups or account; "
                              f"you may ask for: {_describe(offer(cfg, library, groups, account))}")
    return Resolution(image, how, requested)
