"""Remove directory trees whose shape an adversary chose, without recursion.

``shutil.rmtree`` recurses once per directory level, so a 10,000-level tree that agent
code built raised ``RecursionError`` in a sandbox worker's cleanup (and in the next server's
stale-root sweep). :func:`remove_tree` instead *hoists*: it opens one directory at a time
(relative to its parent's descriptor, never following a symlink), moves every subdirectory
it finds up to the top of the tree being removed, deletes everything else, then removes
the emptied directory. Depth, path length (beyond ``PATH_MAX``), symlinks and permission
bits the agent set cannot stop it, and it holds at most three descriptors at any time.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

log = logging.getLogger("tracefix_rl.sandbox")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_HOIST_PREFIX = ".tracefix-rm-"
OWNER_ALL = stat.S_IRWXU
HOIST_ATTEMPTS = 100  # fresh names tried when the agent already took the obvious ones


def remove_tree(path: str) -> bool:
    """Delete ``path`` and everything beneath it; return whether it is gone.

    Never raises for what is inside the tree (failures are logged and leave the rest
    removed); a missing ``path`` counts as removed. A symlink at ``path`` is removed itself,
    never followed.
    """
    try:
        os.rmdir(path)  # the common case: an evaluation left its directory empty
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return _unlink(path)
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EACCES, errno.EPERM):
            log.warning("cannot remove %s: %s", path, exc)
            return False
    root = _open_dir(path, None)
    if root is None:
        return _unlink(path)  # a symlink to a directory, or not a directory after all
    try:
        _empty(root)
    finally:
        os.close(root)
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return False


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return False
    return True


def _open_dir(name: str, parent: int | None) -> int | None:
    """A descriptor of directory ``name`` (relative to ``parent``), never through a symlink;
    if its permission bits lock us out, they are reset first. None if it is not a directory."""
    for attempt in (1, 2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP, errno.ENOENT) or attempt == 2:
                return None
            if exc.errno != errno.EACCES:
                return None
            try:  # chmod follows symlinks: check it is a real directory first
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    return None
                os.chmod(name, OWNER_ALL, dir_fd=parent)
            except OSError:
                return None
    return None


def _empty(root: int) -> None:
    """Delete everything inside the directory open as ``root``."""
    hoisted = 0
    while True:
        subdirs = _clear_files(root)
        if not subdirs:
            return
        progress = False
        for name in subdirs:
            directory = _open_dir(name, root)
            if directory is None:
                progress |= _unlink_at(name, root)
                continue
            try:
                for child in _clear_files(directory):
                    hoisted, moved = _hoist(child, directory, root, hoisted)
                    progress |= moved
            finally:
                os.close(directory)
            try:
                os.rmdir(name, dir_fd=root)
                progress = True
            except OSError:
                pass  # still holds something: the next pass sees it again
        if not progress:
            log.warning("could not empty a directory tree; %d entries remain", len(subdirs))
            return


def _hoist(name: str, directory: int, root: int, counter: int) -> tuple[int, bool]:
    """Move subdirectory ``name`` of ``directory`` up into ``root`` under a fresh name
    (skipping names already taken there); returns the updated counter and success."""
    for _ in range(HOIST_ATTEMPTS):
        counter += 1
        try:
            os.rename(name, f"{_HOIST_PREFIX}{counter}", src_dir_fd=directory, dst_dir_fd=root)
            return counter, True
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                log.warning("cannot move %s out of the way: %s", name, exc)
                return counter, False
    return counter, False


def _clear_files(directory: int) -> list[str]:
    """Unlink every non-directory entry of ``directory``; return its subdirectories."""
    try:
        os.fchmod(directory, OWNER_ALL)  # we own it; the agent may have made it read-only
    except OSError:
        pass
    subdirs: list[str] = []
    try:
        with os.scandir(directory) as entries:
            names = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except OSError as exc:
        log.warning("cannot list a directory to remove it: %s", exc)
        return subdirs
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
        else:
            _unlink_at(name, directory)
    return subdirs


def _unlink_at(name: str, directory: int) -> bool:
    try:
        os.unlink(name, dir_fd=directory)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", name, exc)
        return False
    return True
