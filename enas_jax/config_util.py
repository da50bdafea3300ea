"""Helpers the config files share (light: ml_collections only, no JAX)."""

from __future__ import annotations

import ml_collections


def final_recipe(search, final, exclude=()) -> ml_collections.ConfigDict:
  """The fields of the sections of ``final`` whose values differ from ``search``'s
  (nested, e.g. ``child.out_filters``): a search config's ``search.final_recipe``,
  which ``search.then_final`` applies to train the derived arc. Left out: the
  top-level fields (mode, arc: the final stage sets them), the ``search`` and
  ``final`` sections (the search config carries the final section's values) and
  ``exclude`` (section names or dotted keys: the fields that shape the arc)."""
  out = {}
  for section, fields in final.items():
    if not isinstance(fields, ml_collections.ConfigDict) or section in (
        "search", "final", *exclude):
      continue
    for key, value in fields.items():
      if f"{section}.{key}" not in exclude and value != search[section][key]:
        out.setdefault(section, {})[key] = value
  return ml_collections.ConfigDict(out)
