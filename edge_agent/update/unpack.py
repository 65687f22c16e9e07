"""Bundle archives: a deterministic tar of a bundle directory, and its safe extraction.

`pack_bundle` is what the fleet server publishes as ``models/<name>-<version>.tar``: plain
ustar (no compression, no pax headers), members sorted by path, mtime 0, uid/gid 0, no
user or group names, mode 0644 for files and 0755 for directories. The same directory
always gives the same bytes, so its sha256 can be signed once and checked anywhere.

`unpack_bundle` trusts nothing in the archive beyond its verified hash: it accepts only
regular files and directories under safe relative names, and writes every file itself
with bounded reads (no ``tarfile.extract``), counting bytes and members as it goes.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tarfile
from pathlib import Path
from typing import IO, Final

from edge_agent.durable import fsync_dir
from edge_agent.update.errors import InstallError, Reason

# One path segment: no leading dot (rules out ".", ".." and hidden files), no separators.
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}")
_MAX_NAME_CHARS: Final = 255  # what ustar's prefix + name fields can hold
_MAX_DEPTH: Final = 8
_COPY_BLOCK: Final = 1 << 20
_FILE_TYPES: Final = (tarfile.REGTYPE, tarfile.AREGTYPE)


def pack_bundle(bundle_dir: Path, out_tar: Path) -> None:
    """Write `bundle_dir` as a deterministic tar to `out_tar` (atomically).

    Raises:
        ValueError: a symlink or special file, or a name unsafe or too long for ustar.
        OSError: the directory cannot be read or the archive written.
    """
    members: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(bundle_dir):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath) / name
            members.append((path.relative_to(bundle_dir).as_posix(), path))
    members.sort(key=lambda member: member[0].split("/"))
    for name, path in members:
        problem = _name_problem(name)
        if problem is not None:
            raise ValueError(f"{path}: {problem}")
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise ValueError(f"{path}: not a regular file or directory")
    tmp = out_tar.with_name(f".{out_tar.name}.{secrets.token_hex(6)}.tmp")
    try:
        with tmp.open("xb") as out:
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
                for name, path in members:
                    _add_member(archive, name, path)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, out_tar)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out_tar.parent)


def _add_member(archive: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path.is_dir():
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        archive.addfile(info)
        return
    info.mode = 0o644
    with path.open("rb") as f:
        info.size = os.fstat(f.fileno()).st_size
        archive.addfile(info, f)


def unpack_bundle(tar_path: Path, dest: Path, *, max_bytes: int, max_files: int = 256) -> None:
    """Extract the bundle archive `tar_path` into the new directory `dest`.

    Only regular files (written 0644) and directories (0755) are created; the archive's
    modes, owners and times are ignored. Files and directories are fsync'ed. On any error
    `dest` is removed again.

    Raises:
        InstallError: BAD_ARCHIVE naming the member: not a plain tar, an absolute name, a
            ``..`` or otherwise unsafe name, a link, device or fifo, a duplicate name, more
            than `max_files` members or more than `max_bytes` bytes of file content.
        FileExistsError: `dest` already exists.
    """
    dest.mkdir(mode=0o755)
    try:
        _extract(tar_path, dest, max_bytes, max_files)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(tar_path: Path, dest: Path, max_bytes: int, max_files: int) -> None:
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()  # listed, or parents of listed members
    listed_dirs: set[str] = set()
    total = 0
    try:
        # "r:" and not "r:*": a bundle is never compressed, so no decompressor is exposed.
        with tarfile.open(tar_path, "r:") as archive:
            count = 0
            while (member := archive.next()) is not None:
                count += 1
                name = member.name.removesuffix("/") if member.isdir() else member.name
                if count > max_files:
                    raise _bad(name, f"more than {max_files} members")
                problem = _name_problem(name)
                if problem is not None:
                    raise _bad(name, problem)
                if name in seen_files or name in listed_dirs:
                    raise _bad(name, "duplicate name")
                parents = _parents(name)
                if any(parent in seen_files for parent in parents):
                    raise _bad(name, "inside a path that is a file")
                if member.isdir():
                    listed_dirs.add(name)
                    seen_dirs.update([*parents, name])
                    (dest / name).mkdir(mode=0o755, parents=True, exist_ok=True)
                    continue
                if name in seen_dirs:
                    raise _bad(name, "duplicate name (already a directory)")
                if member.type not in _FILE_TYPES or member.issparse():
                    raise _bad(name, f"not a regular file or directory (type {member.type!r})")
                total += member.size
                if total > max_bytes:
                    raise _bad(name, f"content exceeds {max_bytes} bytes")
                seen_files.add(name)
                seen_dirs.update(parents)
                source = archive.extractfile(member)
                if source is None:
                    raise _bad(name, "has no content")
                _write_file(source, dest / name, member.size, name)
    except (tarfile.TarError, EOFError) as e:
        raise InstallError(Reason.BAD_ARCHIVE, f"{tar_path.name}: not a valid tar: {e}") from e
    for directory in sorted(seen_dirs, key=len, reverse=True):
        fsync_dir(dest / directory)
    fsync_dir(dest)


def _write_file(source: IO[bytes], target: Path, size: int, name: str) -> None:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        remaining = size
        while remaining:
            try:
                block = source.read(min(_COPY_BLOCK, remaining))
            except (tarfile.TarError, EOFError) as e:
                raise _bad(name, f"truncated: {e}") from e
            if not block:
                raise _bad(name, f"truncated: {remaining} of {size} bytes missing")
            out.write(block)
            remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())


def _name_problem(name: str) -> str | None:
    """Why `name` may not be created below the destination, or None if it may."""
    segments = name.split("/")
    if name.startswith("/"):
        return "absolute path"
    if ".." in segments:
        return "'..' component"
    if len(name) > _MAX_NAME_CHARS or len(segments) > _MAX_DEPTH:
        return "name too long or too deep"
    if not all(_SEGMENT.fullmatch(segment) for segment in segments):
        return "unsafe name"
    return None


def _parents(name: str) -> list[str]:
    segments = name.split("/")
    return ["/".join(segments[:i]) for i in range(1, len(segments))]


def _bad(name: str, message: str) -> InstallError:
    return InstallError(Reason.BAD_ARCHIVE, f"archive member {name!r}: {message}")
