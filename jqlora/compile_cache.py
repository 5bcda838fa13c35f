"""JAX's persistent compilation cache for the CLIs (`train`, `generate`, `convert`, `export`): a second run of the same
shapes reads its XLA programs from disk instead of compiling them again.

Where: ``$JQLORA_CACHE_DIR``, else ``$XDG_CACHE_HOME/jqlora``, else ``~/.cache/jqlora``; programs go to
``<that>/xla/jqlora-<version>-jax-<version>-jaxlib-<version>`` (JAX's own keys hash the program, the flags and the
devices; the folder name keeps versions apart and makes an old one easy to delete). Off with
``JQLORA_COMPILATION_CACHE=0``. A cache JAX was already given (``JAX_COMPILATION_CACHE_DIR``, or
``jax.config.update("jax_compilation_cache_dir", ...)`` in the calling program) is left as it is. A cache folder that
cannot be written turns the cache off with one warning line; it never stops a run.
"""

from __future__ import annotations

import os
import sys
import tempfile

ENV_DIR = "JQLORA_CACHE_DIR"
ENV_SWITCH = "JQLORA_COMPILATION_CACHE"
# Programs that compiled faster than this are not written. JAX's default is 1 s; every program is kept here: a small
# model's are mostly faster than that on CPU (the demo's 77 programs, 12 s in all, include 65 under 0.1 s that still
# took 3.6 s together on a loaded machine), and reading one back beats compiling it
MIN_COMPILE_SECS = 0.0


def base_dir() -> str:
    """The jqlora cache folder (not created here)."""
    if os.environ.get(ENV_DIR):
        return os.path.expanduser(os.environ[ENV_DIR])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.expanduser("~/.cache"), "jqlora")


def cache_dir() -> str:
    """The folder of this jqlora / JAX version's programs (imports JAX)."""
    import jax
    import jaxlib

    from jqlora import __version__

    return os.path.join(base_dir(), "xla", f"jqlora-{__version__}-jax-{jax.__version__}-jaxlib-{jaxlib.__version__}")


def is_disabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


def enable() -> str | None:
    """Turn the persistent cache on before the first compilation; the folder in use, or None when off."""
    if is_disabled():
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # the caller's (or JAX_COMPILATION_CACHE_DIR's): theirs to keep
        return jax.config.jax_compilation_cache_dir
    path = cache_dir()
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        print(f"warning: compilation cache off: cannot write {path} ({e.strerror or e}); set {ENV_DIR} to another "
              f"folder or {ENV_SWITCH}=0", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    return path
