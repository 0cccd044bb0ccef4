#!/usr/bin/env python3
"""A fake `gcloud` for launcher tests: plays scripted queued-resource states and records its calls.

Put a copy named `gcloud` on PATH with FAKE_GCLOUD_DIR set. That directory holds:
  scenario.json  {"<queued resource name>": [step, ...]}; a step is a state string ("ACCEPTED",
                 "WAITING_FOR_RESOURCES", "ACTIVE", "FAILED", "SUSPENDED", "PREEMPTED" = ACTIVE with a
                 preemption in its detail) or {"state": S, "exit": {"<process>": rc}} to also write the
                 hosts' exit records into the workdir ($FAKE_GCLOUD_WORKDIR). Each `describe` plays the
                 next step; the last one repeats. A resource without a scenario is ACTIVE.
  calls.jsonl    one JSON argv per call (written by this script).
  world.json     created/deleted resources and their labels (written by this script).
"""

import json
import os
import sys

D = os.environ["FAKE_GCLOUD_DIR"]
FAR_FUTURE = 4102444800  # exit records newer than any attempt start


def _load(name, default):
  try:
    with open(os.path.join(D, name)) as f:
      return json.load(f)
  except FileNotFoundError:
    return default


def _save(name, obj):
  with open(os.path.join(D, name), "w") as f:
    json.dump(obj, f)


def _flag(args, name):
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return None


def main(argv):
  with open(os.path.join(D, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  world = _load("world.json", {"qrs": {}, "cursor": {}})
  scenario = _load("scenario.json", {})
  if argv[:5] == ["alpha", "compute", "tpus", "queued-resources", "create"]:
    name = argv[5]
    if name in world["qrs"] and not world["qrs"][name]["deleted"]:
      print(f"ERROR: ALREADY_EXISTS: {name}", file=sys.stderr)
      return 1
    labels = dict(kv.split("=") for kv in _flag(argv, "labels").split(","))
    world["qrs"][name] = {"deleted": False, "labels": labels}
    _save("world.json", world)
    return 0
  if argv[:5] == ["alpha", "compute", "tpus", "queued-resources", "describe"]:
    name = argv[5]
    qr = world["qrs"].get(name)
    if qr is None or qr["deleted"]:
      print(f"ERROR: (gcloud) NOT_FOUND: Resource {name} was not found", file=sys.stderr)
      return 1
    steps = scenario.get(name, ["ACTIVE"])
    i = world["cursor"].get(name, 0)
    step = steps[min(i, len(steps) - 1)]
    world["cursor"][name] = i + 1
    _save("world.json", world)
    step = {"state": step} if isinstance(step, str) else step
    state = {"state": step["state"]}
    if step["state"] == "PREEMPTED":
      state = {"state": "ACTIVE", "activeData": {"detail": "node preempted"}}
    workdir = os.environ.get("FAKE_GCLOUD_WORKDIR", "")
    for pid, rc in step.get("exit", {}).items():
      path = os.path.join(workdir, "launch", "exit", f"process_{pid}.json")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        json.dump({"rc": rc, "time": FAR_FUTURE}, f)
    print(json.dumps({"name": f"projects/p/locations/z/queuedResources/{name}", "state": state}))
    return 0
  if argv[:5] == ["alpha", "compute", "tpus", "queued-resources", "delete"]:
    name = argv[5]
    qr = world["qrs"].get(name)
    if qr is None or qr["deleted"]:
      print(f"ERROR: NOT_FOUND: {name} not found", file=sys.stderr)
      return 1
    qr["deleted"] = True
    _save("world.json", world)
    return 0
  if argv[:5] == ["alpha", "compute", "tpus", "queued-resources", "list"]:
    flt = _flag(argv, "filter")
    want = flt.split("=", 1)[1] if "=" in flt else None
    out = [{"name": f"projects/p/locations/z/queuedResources/{n}", "labels": q["labels"]}
           for n, q in world["qrs"].items()
           if not q["deleted"] and (want is None or q["labels"].get("rg-launch") == want)]
    print(json.dumps(out))
    return 0
  if argv[:5] == ["alpha", "compute", "tpus", "tpu-vm", "ssh"]:
    # A restart in place: the hosts run the job again, so their old exit records go.
    exit_dir = os.path.join(os.environ.get("FAKE_GCLOUD_WORKDIR", ""), "launch", "exit")
    for name in os.listdir(exit_dir) if os.path.isdir(exit_dir) else []:
      os.remove(os.path.join(exit_dir, name))
    return int(scenario.get("ssh_rc", 0))
  print(f"fake gcloud: unsupported call {argv}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
