"""What every launcher shares: flags, gin parsing, jax.distributed, process environment."""
from __future__ import annotations

import importlib
import os
import sys

_GIN_PREFIX = "--gin."


def set_process_environment() -> None:
  """Quiet TensorFlow and keep it off accelerators that JAX owns. Runs before imports."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  maybe_preload_tcmalloc()


# Debian/Ubuntu `apt-get install libtcmalloc-minimal4`; other distributions' usual places.
_TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
             "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
             "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")


def maybe_preload_tcmalloc() -> None:
  """Re-executes this script with tcmalloc preloaded when it is installed and nothing else is.

  XLA's CPU runtime allocates large fresh buffers every step; glibc malloc hands them back to
  the OS and faults them in again (16-34% of CPU time in a train step here), tcmalloc keeps
  them (see BENCHMARKS.md). Only for a script run directly (never under pytest); set
  PALI_NO_TCMALLOC=1 to keep the default allocator.
  """
  import sys
  if (os.environ.get("LD_PRELOAD") or os.environ.get("PALI_NO_TCMALLOC")
      or "pytest" in sys.modules or not sys.argv or not sys.argv[0].endswith(".py")):
    return
  lib = next((p for p in _TCMALLOC if os.path.exists(p)), None)
  if lib is not None:
    os.environ["LD_PRELOAD"] = lib
    os.execv(sys.executable, [sys.executable] + sys.argv)


class _QuietLibraries:
  """Keeps library INFO chatter (orbax's per-save lines, XLA backend probing) off the console;
  warnings and errors still pass."""
  _NOISY = ("/orbax/", "/jax/_src/", "/etils/")

  def filter(self, record) -> bool:
    import logging as py_logging
    return record.levelno >= py_logging.WARNING or not any(
        n in record.pathname for n in self._NOISY)


def quiet_library_logs() -> None:
  from absl import logging
  logging.get_absl_handler().addFilter(_QuietLibraries())


def define_common_flags() -> None:
  from absl import flags

  flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order.")
  flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'train.train_steps = 10'.")
  flags.DEFINE_multi_string("gin_search_paths", [], "Extra folders to look up gin files and "
                            "their includes in.")
  flags.DEFINE_multi_string("module_import", [], "Python modules to import before parsing gin "
                            "(e.g. one that registers your own seqio tasks).")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods detect "
                    "their peers by themselves).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
  flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.")
  flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")


def rewrite_gin_shortcuts(argv: list[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (as t5x's launchers accept)."""
  out = []
  for arg in argv:
    if arg.startswith(_GIN_PREFIX):
      name, sep, value = arg[len(_GIN_PREFIX):].partition("=")
      if not sep:
        raise SystemExit(f"error: {arg!r} needs a value: --gin.{name}=VALUE")
      out.append(f"--gin_bindings={name} = {value}")
    else:
      out.append(arg)
  return out


def parse_flags_with_gin_shortcuts(argv: list[str]):
  from absl import flags
  return flags.FLAGS(rewrite_gin_shortcuts(argv))


def maybe_initialize_distributed() -> None:
  import jax
  from absl import flags

  f = flags.FLAGS
  address = f.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = f.num_processes or (int(os.environ["JAX_NUM_PROCESSES"])
                            if "JAX_NUM_PROCESSES" in os.environ else None)
  pid = f.process_id if f.process_id is not None else (
      int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None)
  if address and num and num > 1:
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  elif f.multihost:
    jax.distributed.initialize()


_PROJECT_MODULES = ("pali.models.pali", "pali.training.trainer", "pali.partitioning",
                    "pali.training.stages", "pali.data.cache",  # @cached_dataset
                    "pali.training.optimizer", "pali.warm_start", "tasks")


def parse_gin(gin_files=(), gin_bindings=(), *, module_imports=(), search_paths=(),
              required_macros=("MODEL_DIR", "MIXTURE"), finalize=True) -> None:
  """Imports the project's configurables and the user's modules, then parses gin.

  Raises ConfigError (from pali.training.validation) with a message naming the problem.
  """
  import gin

  from pali.training.validation import ConfigError

  for module in _PROJECT_MODULES:
    importlib.import_module(module)
  repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for path in [repo_root, os.path.join(repo_root, "gin_configs")] + list(search_paths):
    gin.add_config_file_search_path(path)
  for module in module_imports:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"--module_import={module!r} could not be imported: {e}. Is it on "
                        "PYTHONPATH?") from e
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings),
                                        finalize_config=False)
  except (ValueError, SyntaxError, OSError, KeyError) as e:
    raise ConfigError(f"The gin configuration is invalid: {e}\nCheck each binding's name "
                      "(configurable.parameter) against the gin files in gin_configs/ and the "
                      "README's list of bindings.") from e
  for macro in required_macros:
    try:
      value = gin.query_parameter(f"%{macro}")
    except ValueError:
      value = None
    if value in (None, ""):
      raise ConfigError(f"The gin macro {macro} is not set. Add --gin.{macro}=\"'...'\" or bind "
                        "it in your gin file.")
  if finalize:
    gin.finalize()


def import_modules_and_parse_gin(required_macros=("MODEL_DIR", "MIXTURE")) -> None:
  """parse_gin() from the command-line flags."""
  from absl import flags

  f = flags.FLAGS
  parse_gin(f.gin_file, f.gin_bindings, module_imports=f.module_import,
            search_paths=f.gin_search_paths, required_macros=required_macros)


def exit_now(code: int) -> None:
  """Ends the process once everything is saved and flushed.

  Interpreter teardown can hang on tf.data prefetch threads still inside a Python-level
  source (seen after 'Training finished' and after a SIGTERM save); checkpoints and metric
  writers are closed before this is called, so nothing is lost by skipping the teardown.
  """
  import jax
  from absl import logging
  try:
    if jax.process_count() > 1:
      jax.distributed.shutdown()
  finally:
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def user_errors() -> tuple[type[Exception], ...]:
  """Errors that are the user's to fix: printed as one message, exit code 2."""
  from pali.training import validation
  return (validation.ConfigError,)
