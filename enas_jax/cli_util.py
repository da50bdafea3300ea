"""Command-line helpers shared by the CLIs (main, seeds, benchmark) and the
environment switches the library reads."""

from __future__ import annotations

import os
import re
import sys


def env_switch(name: str, hint: str, *, allow_auto: bool = False) -> bool | None:
  """The on/off environment variable ``name``: True (1, true, yes, on), False
  (0, false, no, off) or None (unset, empty, or ``auto`` where allowed). Any
  other value raises a ValueError that ends with ``set it to {hint}``."""
  value = os.environ.get(name, "").strip().lower()
  if value == "" or (allow_auto and value == "auto"):
    return None
  if value in ("1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"{name}={os.environ[name]!r} is not understood; set it to {hint}.")


def parse_flags(argv):
  """absl flag parsing that turns a bad flag or an unknown ``--config.*`` key
  into one ``error:`` line and exit status 2 (no traceback)."""
  from absl import flags
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}\nPass --helpfull to see the flags.", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.* key
    hint = re.search(r"Did you mean [^\n]*\?", str(e))
    keys = [a.split("=", 1)[0] for a in argv[1:] if re.match(r"^-{1,2}(no)?config\.", a)]
    renamed = _renamed_hint(keys)
    if renamed:
      print(f"error: {renamed}", file=sys.stderr)
      sys.exit(2)
    print(f"error: unknown config field among {' '.join(keys)}: {e!s}"
          if not hint else f"error: unknown config field among {' '.join(keys)}. {hint.group(0)}",
          file=sys.stderr)
    sys.exit(2)


def _renamed_hint(keys) -> str:
  """'--config.a.b was renamed: use --config.c.d' for a key of a renamed field, else ''."""
  from enas_jax.train import common  # the one table of renamed fields
  for key in keys:
    name = re.sub(r"^-{1,2}(no)?config\.", "", key)
    if name in common.RENAMED_FIELDS:
      new_name = common.RENAMED_FIELDS[name][0]
      return (f"config field {name} was renamed to {new_name}: pass "
              f"{key.replace(name, new_name)}=... instead.")
  return ""
