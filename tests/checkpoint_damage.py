"""Damage done to a committed checkpoint step, as a bad disk or a bad copy would (no tests here).

Shared by tests/test_checkpoint_manager.py (toy states, in process) and tests/test_resume.py (real
training runs in subprocesses).
"""

import os


def largest_data_file(item_dir):
  """The largest array data file of an item (OCDBT keeps them under ocdbt.process_<i>/d/)."""
  files = [os.path.join(root, f) for root, _, names in os.walk(item_dir)
           if os.path.basename(root) == "d" and "ocdbt.process_" in root for f in names]
  return max(files, key=os.path.getsize)


# Invalid UTF-8 (the decode error the issue saw) followed by what is not JSON either.
GARBAGE = b"\xff\xfe\x00\x17garbage{"


def damage(step_dir, kind: str) -> str:
  """Damages one file of a committed step like a bad disk or a bad copy would; returns its path.

  kind: `<item>_data_{truncated,deleted,bitflip}` (item params or state: its largest data file),
  `<item>_metadata_{garbage,emptied}` (params/_METADATA, state/_METADATA, the meta item's file),
  `ocdbt_manifest_emptied`, `commit_marker_removed`."""
  step_dir = str(step_dir)
  item, what = kind.split("_", 1)
  if what.startswith("data_"):
    path = largest_data_file(os.path.join(step_dir, item))
    if what == "data_truncated":
      os.truncate(path, os.path.getsize(path) // 2)
    elif what == "data_deleted":
      os.remove(path)
    else:  # 64 bytes inverted in the middle; size unchanged
      data = bytearray(open(path, "rb").read())
      for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
      open(path, "wb").write(bytes(data))
    return path
  path = {"params_metadata": "params/_METADATA", "state_metadata": "state/_METADATA",
          "meta_metadata": "meta/metadata", "ocdbt_manifest": "params/manifest.ocdbt",
          "commit_marker": "commit_success.txt"}[kind.rsplit("_", 1)[0]]
  path = os.path.join(step_dir, path)
  assert os.path.exists(path), path
  if kind.endswith("_removed"):
    os.remove(path)
  else:
    open(path, "wb").write(b"" if kind.endswith("_emptied") else GARBAGE)
  return path


DAMAGE_KINDS = [f"{item}_data_{how}" for item in ("params", "state")
                for how in ("truncated", "deleted", "bitflip")] + [
                    f"{item}_metadata_{how}" for item in ("params", "state", "meta")
                    for how in ("garbage", "emptied")] + [
                        "ocdbt_manifest_emptied", "commit_marker_removed"]
# Damage that leaves the step readable and correct: Orbax commits a local step by renaming it, so
# the commit marker is only read on object stores; resume keeps such a step.
HARMLESS = ("commit_marker_removed",)
