"""Damage done to a committed checkpoint step, as a bad disk or a bad copy would (no tests here).

Shared by tests/test_checkpoint_manager.py (toy states, in process) and tests/test_resume.py (real
training runs in subprocesses).
"""

import os

import tensorstore as ts


def largest_data_file(item_dir):
  """The largest array data file of an item (OCDBT keeps them under ocdbt.process_<i>/d/)."""
  files = [os.path.join(root, f) for root, _, names in os.walk(item_dir)
           if os.path.basename(root) == "d" and "ocdbt.process_" in root for f in names]
  return max(files, key=os.path.getsize)


# Invalid UTF-8 (the decode error the issue saw) followed by what is not JSON either.
GARBAGE = b"\xff\xfe\x00\x17garbage{"

# Zstandard frames (RFC 8878), as TensorStore stores each array chunk in an OCDBT data file.
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_RAW, _RLE = 0, 1  # block types


def _zstd_frames(data: bytes) -> list[tuple[int, int, int, int]]:
  """(start, header length, content size, end) of the zstd frames that fill `data` from byte 0 on,
  one after another (what follows the last one, e.g. b-tree nodes, is left out)."""
  frames, pos = [], 0
  while data[pos:pos + 4] == _ZSTD_MAGIC:
    descriptor = data[pos + 4]
    single_segment, dict_flag, fcs_flag = (descriptor >> 5) & 1, descriptor & 3, descriptor >> 6
    fcs_size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    fcs_at = pos + 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = int.from_bytes(data[fcs_at:fcs_at + fcs_size], "little") + (256 if fcs_flag == 1 else 0)
    assert fcs_size, "a zstd frame without its content size cannot be re-framed"
    end = fcs_at + fcs_size
    while True:
      header = int.from_bytes(data[end:end + 3], "little")
      end += 3 + (1 if (header >> 1) & 3 == _RLE else header >> 3)
      if header & 1:
        break
    end += 4 if descriptor & 4 else 0  # content checksum
    frames.append((pos, fcs_at + fcs_size - pos, size, end))
    pos = end
  return frames


def _corrupt_a_chunk(path: str) -> None:
  """Changes the stored bytes of the largest chunk in a data file so that it still decodes, to other
  values: the silent corruption only the checkpoint's checksums catch. (Inverting bytes of a
  compressed block at random may instead make the decoder fail, or land between chunks in bytes no
  read uses, so the outcome would depend on the file's layout, which differs from save to save.)
  The chunk's frame is rewritten in place at its length: one raw block of bytes that are not its
  content, then one run-length block that fills the rest of the content size."""
  data = bytearray(open(path, "rb").read())
  frames = _zstd_frames(bytes(data))
  assert frames, f"{path} does not start with a zstd frame"
  start, header, size, end = max(frames, key=lambda f: f[3] - f[0])
  raw = end - start - header - 3 - 4  # the frame's length less its header and two block headers
  assert 0 < raw < size <= 128 * 1024, (path, start, end, size)  # each block within the block limit
  assert not data[start + 4] & 4, f"{path}: a frame with a content checksum"
  at = start + header
  data[at:at + 3] = (raw << 3 | _RAW << 1).to_bytes(3, "little")
  for i in range(at + 3, at + 3 + raw):  # the old compressed bytes, inverted: not the content
    data[i] ^= 0xFF
  data[end - 4:end - 1] = ((size - raw) << 3 | _RLE << 1 | 1).to_bytes(3, "little")
  data[end - 1] = 0xA5
  open(path, "wb").write(bytes(data))


def garble_chunk(step_dir, item: str, key: str) -> str:
  """Overwrites the zstd magic number of one stored array chunk (`key`, e.g.
  "embedder.input_embedding/0.1") so that only reads of that chunk fail to decode; returns the data
  file. On a multi-process restore only the process whose shard holds the chunk hits the damage.
  Where the chunk lies comes from the item's OCDBT b-tree (TensorStore's own dump)."""
  item_dir = os.path.join(str(step_dir), item)
  kv = ts.KvStore.open({"driver": "file", "path": item_dir + os.sep}).result()
  root = ts.ocdbt.dump(kv).result()["versions"][-1]
  assert root["root_height"] == 0, f"{item_dir}: a b-tree of more than one node"
  entries = ts.ocdbt.dump(kv, root["root"]["location"]).result()["entries"]
  value = next(e["indirect_value"] for e in entries if e["key"] == key.encode())
  # "value:<prefix>:<data file>:<offset>:<length>", the prefix relative to the item
  _, prefix, name, offset, _ = value.split(":")
  path = os.path.join(item_dir, prefix, name)
  with open(path, "r+b") as f:
    f.seek(int(offset))
    assert f.read(4) == _ZSTD_MAGIC, (path, offset)
    f.seek(int(offset))
    f.write(b"\0" * 4)
  return path


def damage(step_dir, kind: str) -> str:
  """Damages one file of a committed step like a bad disk or a bad copy would; returns its path.

  kind: `<item>_data_{truncated,deleted,altered}` (item params or state: its largest data file),
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
    else:  # one chunk decodes to other values; size unchanged
      _corrupt_a_chunk(path)
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
                for how in ("truncated", "deleted", "altered")] + [
                    f"{item}_metadata_{how}" for item in ("params", "state", "meta")
                    for how in ("garbage", "emptied")] + [
                        "ocdbt_manifest_emptied", "commit_marker_removed"]
# Damage that leaves the step readable and correct: Orbax commits a local step by renaming it, so
# the commit marker is only read on object stores; resume keeps such a step.
HARMLESS = ("commit_marker_removed",)
