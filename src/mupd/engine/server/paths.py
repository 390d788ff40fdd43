"""Path confinement: a client names only files inside the folders the server was started with."""

from __future__ import annotations

from pathlib import Path

from .. import wire
from .errors import AccessDenied


def confine(path: str, roots: list[Path], what: str) -> Path:
    """`path` with symlinks resolved, if it lies inside one of `roots` (AccessDenied if not).

    A relative path is taken under the first root where it exists (else under the first root).
    """
    if not roots:
        raise AccessDenied(f"this server has no folder configured for a {what} ({path!r}): "
                           "start it with the matching --slide-root / --model-root option")
    given = Path(path).expanduser()
    try:  # exists() stats each candidate: the OS may refuse the name itself (too long)
        candidates = [given.resolve()] if given.is_absolute() else [(root / given).resolve() for root in roots]
        resolved = next((c for c in candidates if c.exists()), candidates[0])
    except (OSError, ValueError) as exc:
        shown = ascii(path) if len(path) <= 80 else ascii(path[:80]) + "..."
        raise wire.WireError(f"{what} {shown} cannot be used: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    if not any(resolved.is_relative_to(root) for root in roots):
        raise AccessDenied(f"{what} {path!r} is outside the folders this server may use")
    return resolved
