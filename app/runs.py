"""Where the Train page's runs write: one temporary folder per run, deleted once nothing can use it.

What lives here: :class:`RunFolders` (the folder of every run this server started, the browser session that
owns it, and whether the run has ended) and :func:`run_folders`, the server's one instance. What does not: the
runs themselves (``pages/train.py``), the model-picker entries that point at their checkpoints
(:mod:`app.registry`).

A run's folder (``tempfile.mkdtemp(prefix="jem_explorer_train_")``) holds its checkpoint ``OUT``, which the
model picker, the download button and "Save into folder" read for as long as the session lasts (also after a
newer run of the same session: its model stays in the picker), and ``OUT.resume.pt``, the trainer's full resume
state (optimizer, whole replay buffer), which the app never reads. When a run ends its resume state is
deleted, and the whole folder when no checkpoint was written; once the session that started the run is gone
(its tab closed), the folder is deleted by the next sweep (every start of a run and every run of the Train
page); folders still there when the server exits are deleted then (``atexit``).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

import streamlit as st

from app.compute import session_alive

__all__ = ["RunFolders", "run_folders", "PREFIX"]

PREFIX = "jem_explorer_train_"


class RunFolders:
    """The temporary folders of training runs, each owned by a browser session (thread-safe).

    Args:
        alive: ``alive(session id) -> bool``, True while that browser session is connected
            (:func:`app.compute.session_alive`).
        root: where folders are made (default: the system's temp folder, ``tempfile.gettempdir()``).
    """

    def __init__(self, alive: Callable[[str | None], bool], root: str | None = None):
        self._alive = alive
        self._root = root
        self._lock = threading.Lock()
        self._folders: dict[Path, dict] = {}  # folder -> {"session": id or None, "ended": bool}

    @property
    def folders(self) -> list[Path]:
        """The folders that exist now, oldest first."""
        with self._lock:
            return list(self._folders)

    def new(self, session: str | None) -> Path:
        """A fresh empty folder ``PREFIX*`` for a run started by ``session``.

        Raises:
            OSError: the folder cannot be made.
        """
        folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self._root))
        with self._lock:
            self._folders[folder] = {"session": session, "ended": False}
        return folder

    def ended(self, folder: Path, checkpoint: Path) -> None:
        """The run writing into ``folder`` has ended: delete its resume state (``checkpoint`` + ``.resume.pt``),
        and the whole folder when ``checkpoint`` was never written (nothing for the picker). Errors are ignored."""
        folder = Path(folder)
        Path(str(checkpoint) + ".resume.pt").unlink(missing_ok=True)
        with self._lock:
            if folder in self._folders:
                self._folders[folder]["ended"] = True
        if not Path(checkpoint).is_file():
            self._remove(folder)

    def sweep(self) -> list[Path]:
        """Delete the folders of ended runs whose session is gone; returns the folders deleted."""
        with self._lock:
            done = [f for f, s in self._folders.items() if s["ended"] and not self._alive(s["session"])]
        for f in done:
            self._remove(f)
        return done

    def remove_all(self) -> None:
        """Delete every folder (at server exit)."""
        for f in self.folders:
            self._remove(f)

    def _remove(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        with self._lock:
            self._folders.pop(folder, None)


@st.cache_resource
def run_folders() -> RunFolders:
    """The server's :class:`RunFolders` (shared by all sessions); its folders are deleted at server exit."""
    folders = RunFolders(session_alive)
    atexit.register(folders.remove_all)
    return folders
