"""The GKE JobSet, validated against the JobSet CRD's OpenAPI schema (vendored: tests/data/jobset/,
kubernetes-sigs/jobset v0.12.0, Apache-2.0), which embeds the Kubernetes core Job and Pod schemas.

Kubernetes prunes fields a structural schema does not declare, so a misspelt field would be dropped
silently; the test makes the schema strict (no undeclared properties) to catch that. The CRD's CEL
rules and the core-API rules a schema cannot express are checked by hand below.
"""

import copy
import json
import os
import re

import jsonschema
import pytest
import yaml

from launch import commands
from launch import spec as spec_lib
from launch.backends import gke
from recurrentgemma_tpu import exit_codes

SCHEMA = os.path.join(os.path.dirname(__file__), "data", "jobset", "jobset_v1alpha2.schema.json")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _strict(node):
  if isinstance(node, dict):
    node = {k: _strict(v) for k, v in node.items()}
    if ("properties" in node and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")):
      node["additionalProperties"] = False
    return node
  if isinstance(node, list):
    return [_strict(x) for x in node]
  return node


@pytest.fixture(scope="module")
def validator():
  with open(SCHEMA) as f:
    return jsonschema.Draft7Validator(_strict(json.load(f)))


def _spec(target="v5p-16", num_slices=1):
  return spec_lib.JobSpec(config="configs/tiny.py", overrides=("train.steps=5",),
                          workdir="gs://b/runs/griffin-1b", backend="gke",
                          target=spec_lib.parse_target(target), num_slices=num_slices,
                          zone="us-east5", project="p", cluster="c", image="python:3.11",
                          fingerprint="ab" * 32)


def _errors(validator, obj):
  return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(obj))


@pytest.mark.parametrize("target, num_slices", [("v5p-16", 1), ("v5p-16", 4), ("v5litepod-8", 1),
                                                ("v6e-256", 2)])
def test_jobset_is_valid_and_xpk_shaped(validator, target, num_slices):
  spec = _spec(target, num_slices)
  # Through YAML, as kubectl receives it.
  js = yaml.safe_load(gke.to_yaml(commands.jobset(spec, 3, "gs://b/w.whl")))
  assert _errors(validator, js) == []
  meta = js["metadata"]
  assert DNS1035.match(meta["name"]) and len(meta["name"]) <= 40  # JobSet derives longer names
  for k, v in meta["labels"].items():
    assert LABEL_KEY.match(k) and LABEL_VALUE.match(v) and len(v) <= 63, (k, v)
  assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "multislice-queue"
  assert meta["labels"][commands.LABEL] == spec.run_id
  assert meta["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == \
      "cloud.google.com/gke-nodepool"
  (rjob,) = js["spec"]["replicatedJobs"]
  assert rjob["replicas"] == num_slices
  job = rjob["template"]["spec"]
  t = spec.target
  assert job["parallelism"] == job["completions"] == t.hosts
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": t.gke_accelerator,
                                 "cloud.google.com/gke-tpu-topology": t.topology}
  (c,) = pod["containers"]
  assert c["resources"]["limits"]["google.com/tpu"] * t.hosts == t.chips
  env = {e["name"]: e.get("value") for e in c["env"]}
  assert env["JAX_NUM_PROCESSES"] == str(t.hosts * num_slices)
  assert ("MEGASCALE_NUM_SLICES" in env) == (num_slices > 1)
  # The container runs exactly the trainer.
  assert commands.quote(commands.train_argv(spec)) in c["command"][-1]
  # CEL rule of the CRD: startupPolicy InOrder and dependsOn are mutually exclusive (we use neither).
  assert "startupPolicy" not in js["spec"] and "dependsOn" not in rjob


def test_restart_policy_by_exit_code():
  js = commands.jobset(_spec(), 1, "gs://b/w.whl")
  job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
  # Core API rules a schema cannot express: podFailurePolicy needs restartPolicy Never, at most 255
  # unique exit codes per rule, and the container it names must exist.
  assert job["template"]["spec"]["restartPolicy"] == "Never" and job["backoffLimit"] == 0
  (fail, ignore) = job["podFailurePolicy"]["rules"]
  codes = fail["onExitCodes"]["values"]
  assert fail["action"] == "FailJob" and fail["onExitCodes"]["operator"] == "NotIn"
  assert len(codes) <= 255 and len(set(codes)) == len(codes) and codes == sorted(codes)
  assert fail["onExitCodes"]["containerName"] == job["template"]["spec"]["containers"][0]["name"]
  # 42 (preempted, saved) and deaths by signal restart; 1, 2, 3 fail the JobSet at once.
  assert exit_codes.PREEMPTED in codes and 137 in codes and 143 in codes
  assert not {0, 1, 2, 3} & set(codes)
  assert ignore["action"] == "Ignore"  # node disruption (preemption) does not count as a failure
  fp = js["spec"]["failurePolicy"]
  assert [(r["action"], r["onJobFailureReasons"]) for r in fp["rules"]] == [
      ("FailJobSet", ["PodFailurePolicy"])]
  assert fp["maxRestarts"] == 103


@pytest.mark.parametrize("path, value", [
    (("spec", "replicatedJobs", 0, "template", "spec", "backofLimit"), 0),  # typo
    (("spec", "replicatedJobs", 0, "replicas"), "2"),  # wrong type
    (("spec", "failurePolicy", "rules", 0, "action"), "Restart"),  # not in the enum
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0,
      "comand"), ["x"]),  # typo inside the embedded core Pod schema
])
def test_validator_catches_broken_manifests(validator, path, value):
  """Control: the strict schema rejects the mistakes it is meant to catch."""
  js = copy.deepcopy(commands.jobset(_spec(), 1, "gs://b/w.whl"))
  node = js
  for p in path[:-1]:
    node = node[p]
  node[path[-1]] = value
  assert _errors(validator, js), path
