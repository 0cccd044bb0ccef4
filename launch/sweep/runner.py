"""`run`: claims trials one by one and runs each through the launcher until the sweep is finished.

Each trial runs as `python -m launch.submit --backend=B --num_processes=1 --config=SPEC
--workdir=ROOT/trials/ID --skip_fit_check --max_preemptions=0 --max_failures=0 --config.K=V ...`:
one attempt per launch, because the restart decisions are made here, once, by launch/supervisor.py
with the sweep's budgets (`max_restarts` preemptions per lease, the definition's `retries`
failures per trial). An exit the supervisor calls fatal (2 user error, 3 NaN, 4 no fit) is recorded
as such and never retried; a preempted one (42) is relaunched and resumes from the trial's
checkpoint. A driver only runs trials it holds a lease on (state.py), so several drivers can share
one root. A driver killed mid-trial, even by SIGKILL, takes its trial down with it: the kernel sends
the trial's launcher SIGTERM, which passes it on, and the trainer saves and exits 42; the next
driver resumes after that save.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from launch import progress as progress_lib
from launch import spec as spec_lib
from launch import supervisor
from launch.sweep import definition
from launch.sweep import state as state_lib
from launch.sweep import store
from launch.sweep import targets as targets_lib
from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import gcs
from recurrentgemma_tpu import preemption
from recurrentgemma_tpu import workdir as workdir_lib

HEARTBEAT_EVERY_S = 15.0
POLL_S = 2.0


@dataclasses.dataclass
class Options:
  backend: str = "local"
  parallel: int = 1
  retries: int = 2
  max_restarts: int = 3  # relaunches after exit 42 within one lease
  ttl_s: float = state_lib.DEFAULT_TTL_S
  trial_command: str = ""  # a template replacing the launcher (tests): {workdir} {id} {spec} {root}
  target: str = ""  # pod backends: --target of every trial (when `targets` is empty)
  targets: tuple[str, ...] = ()  # pod backends: candidates; each trial gets the first it fits on
  launch_flags: tuple[str, ...] = ()  # more launch.submit flags (--zone, --project, --poll, ...)
  quiet: bool = False

  @property
  def budgets(self) -> spec_lib.Budgets:
    """The supervisor's budgets for one trial: preemptions per lease, failures per trial."""
    return spec_lib.Budgets(max_preemptions=self.max_restarts, max_failures=self.retries)


def trial_argv(trial: definition.Trial, root: str, opts: Options, target: str = "") -> list[str]:
  """The command that runs one trial (`target`: its planned TPU target, else opts.target)."""
  workdir = state_lib.trial_dir(root, trial.id)
  if opts.trial_command:
    text = opts.trial_command.format(workdir=workdir, id=trial.id, spec=trial.spec, root=root)
    return shlex.split(text)
  overrides = [f"--config.{o}" for o in trial.overrides]
  if importlib.util.find_spec("launch.submit") is not None:
    # One attempt per launch: the restart decisions are this driver's (Options.budgets).
    argv = [sys.executable, "-m", "launch.submit", f"--backend={opts.backend}",
            f"--config={trial.spec}", f"--workdir={workdir}", "--skip_fit_check",
            "--max_preemptions=0", "--max_failures=0"]
    if opts.backend == "local":
      argv.append("--num_processes=1")
    if target or opts.target:
      argv.append(f"--target={target or opts.target}")
    return argv + list(opts.launch_flags) + overrides
  return [sys.executable, "-m", "recurrentgemma_tpu.train", f"--config={trial.spec}",
          f"--workdir={workdir}"] + overrides


def _die_with_parent() -> None:
  """In the child: get SIGTERM when the driver dies (even by SIGKILL), so no trial is orphaned."""
  preemption.set_parent_death_signal(signal.SIGTERM)


def _log_path(root: str, trial_id: str, lease: int) -> str:
  if gcs.is_gcs(root):
    base = os.path.join(os.path.expanduser("~/.cache/recurrentgemma_tpu/sweep_logs"),
                        root[len("gs://"):].replace("/", "_"))
  else:
    base = os.path.join(root, "logs")
  os.makedirs(base, exist_ok=True)
  return os.path.join(base, f"{trial_id}.{lease}.log")


@dataclasses.dataclass
class _Running:
  trial: definition.Trial
  lease: int
  proc: subprocess.Popen
  start: float
  restarts: int = 0
  last_beat: float = 0.0
  log: str = ""
  cpu_s: float = 0.0  # CPU seconds of the finished processes of this lease (trainer included)
  gen: store.Generation | None = 0  # generation of our last heartbeat (renew's CAS)


class Driver:
  """Runs the trials of one sweep root until each is done, failed or held by another driver."""

  def __init__(self, root: str, trials: Sequence[definition.Trial], opts: Options,
               printer: Callable[[str], None] | None = None):
    self.root, self.trials, self.opts = root, list(trials), opts
    self.running: dict[str, _Running] = {}
    self.stopping = False
    self.print = printer or (lambda s: print(s, flush=True))
    self._last_bar = 0.0
    self.plan: dict[str, dict] = {}  # trial id -> targets.plan's choice (pod backends)

  # ---------------------------------------------------------------- processes

  def _launch(self, trial: definition.Trial, lease: int, gen: store.Generation,
              restarts: int = 0) -> None:
    argv = self._argv(trial)
    log = _log_path(self.root, trial.id, lease)
    with open(log, "a") as f:
      f.write(f"$ {shlex.join(argv)}\n")
      f.flush()
      # A trainer run directly (trial_command) follows this driver itself (preemption.py).
      env = {**os.environ, preemption.PARENT_PID_ENV: str(os.getpid())}
      proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, preexec_fn=_die_with_parent, env=env)
    new_gen = state_lib.renew(self.root, trial.id, lease, gen, child_pid=proc.pid)
    self.running[trial.id] = _Running(trial, lease, proc, time.time(), restarts, time.time(), log,
                                      gen=new_gen)
    if new_gen is None:
      self._lost(self.running[trial.id])
    if not self.opts.quiet:
      self.print(f"start {trial.id} {trial.label} (lease {lease}{', restart ' + str(restarts) if restarts else ''}) log {log}")

  def _finish(self, r: _Running, rc: int) -> None:
    trial, root = r.trial, self.root
    del self.running[trial.id]
    fields = {"rc": rc, "start": r.start, "end": time.time(), "restarts": r.restarts,
              "cpu_s": r.cpu_s,
              "argv": self._argv(trial), "log": r.log}
    if self.stopping:
      state_lib.record_attempt(root, trial.id, r.lease, "interrupted", **fields)
      return
    outcome = supervisor.classify([rc])
    if outcome.kind == supervisor.DONE and not (
        self.opts.trial_command or state_lib.completed(state_lib.trial_dir(root, trial.id),
                                                       trial.info["steps"])):
      outcome = supervisor.failed("exit 0 but no final evaluation at train.steps in metrics.jsonl")
    if outcome.kind == supervisor.DONE:
      state_lib.record_attempt(root, trial.id, r.lease, state_lib.DONE, **fields)
      self.print(f"done  {trial.id} {trial.label} in {fields['end'] - r.start:.0f}s")
      return
    prior = state_lib.read_state(root, trial.id, self.opts.retries, self.opts.ttl_s)
    ledger = state_lib.Ledger(preemptions=r.restarts, failures=prior.failures)
    give_up = supervisor.charge(ledger, outcome, self.opts.budgets)
    if outcome.kind == supervisor.PREEMPTED and not give_up:
      self.print(f"restart {trial.id} ({outcome.detail}: resuming)")
      start, cpu = r.start, r.cpu_s
      self._launch(trial, r.lease, r.gen, r.restarts + 1)
      self.running[trial.id].start = start
      self.running[trial.id].cpu_s = cpu
      return
    # preempted over the lease's budget: interrupted (the next lease resumes); failed: retried by
    # a later claim while the failure budget lasts; fatal: never again.
    kind = {supervisor.PREEMPTED: "interrupted", supervisor.FAILED: "failed",
            supervisor.FATAL: state_lib.FATAL}[outcome.kind]
    fields["error"] = give_up or outcome.detail
    state_lib.record_attempt(root, trial.id, r.lease, kind, **fields)
    self.print(f"{kind} {trial.id} {trial.label}: {fields['error']}, log {r.log}")

  def _argv(self, trial: definition.Trial) -> list[str]:
    return trial_argv(trial, self.root, self.opts,
                      (self.plan.get(trial.id) or {}).get("target") or "")

  def _poll(self) -> None:
    now = time.time()
    for r in list(self.running.values()):
      rc = self._reap(r)
      if rc is not None:
        self._finish(r, rc)
        continue
      if now - r.last_beat >= HEARTBEAT_EVERY_S:
        r.gen = state_lib.renew(self.root, r.trial.id, r.lease, r.gen, child_pid=r.proc.pid)
        if r.gen is None:
          self._lost(r)
          continue
        r.last_beat = now

  def _lost(self, r: _Running) -> None:
    """Our heartbeat went stale (e.g. the machine stalled) and another driver closed our lease."""
    self.print(f"lost lease on {r.trial.id}; stopping our copy")
    self._terminate(r.proc)
    r.proc.wait()
    del self.running[r.trial.id]

  @staticmethod
  def _reap(r: _Running) -> int | None:
    """The exit code if the trial's process ended (its CPU seconds, children included, go to r)."""
    if r.proc.returncode is not None:
      return r.proc.returncode
    try:
      pid, status, usage = os.wait4(r.proc.pid, os.WNOHANG)
    except ChildProcessError:
      return r.proc.poll()
    if pid == 0:
      return None
    r.proc.returncode = os.waitstatus_to_exitcode(status)
    r.cpu_s += usage.ru_utime + usage.ru_stime
    return r.proc.returncode

  @staticmethod
  def _terminate(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass

  def stop(self, grace_s: float = 120.0) -> None:
    """SIGTERM to every running trial (they save and exit 42), then record them interrupted."""
    self.stopping = True
    for r in self.running.values():
      self._terminate(r.proc)
    deadline = time.time() + grace_s
    while self.running and time.time() < deadline:
      self._poll()
      time.sleep(0.2)
    for r in list(self.running.values()):
      self._terminate(r.proc, signal.SIGKILL)
      r.proc.wait()
      self._finish(r, r.proc.returncode)

  # ---------------------------------------------------------------- loop

  def states(self) -> dict[str, state_lib.TrialState]:
    return {t.id: state_lib.read_state(self.root, t.id, self.opts.retries, self.opts.ttl_s)
            for t in self.trials}

  def run(self) -> dict[str, state_lib.TrialState]:
    """Runs until no trial is left to run here; returns the final states."""
    for t in self.trials:
      state_lib.write_trial(self.root, t)
    if self.opts.targets and self.opts.backend != "local":
      # Every trial's target before the first submission; one that fits nowhere is failed here.
      self.plan = targets_lib.plan(self.root, self.trials, self.opts.targets, log=self.print)
    while not self.stopping:
      self._poll()
      states = self.states()
      free = self.opts.parallel - len(self.running)
      for t in self.trials:
        if free <= 0 or self.stopping:
          break
        if t.id in self.running or states[t.id].state not in (state_lib.PENDING, state_lib.RETRY):
          continue
        lease = state_lib.claim_lease(self.root, t.id, self.opts.ttl_s)
        if lease is None:
          continue
        self._launch(t, *lease)
        free -= 1
      states = self.states()
      waiting = [i for i, s in states.items()
                 if s.state in (state_lib.RUNNING, state_lib.PENDING, state_lib.RETRY)]
      if not self.running and not waiting:
        break
      self._progress(states)
      time.sleep(POLL_S)
    states = self.states()
    self._progress(states, force=True)
    return states

  def _progress(self, states: dict[str, state_lib.TrialState], force: bool = False) -> None:
    """A progress bar on a terminal; a line every 30 s otherwise."""
    tty = sys.stdout.isatty()
    now = time.time()
    if self.opts.quiet or (not force and now - self._last_bar < (1.0 if tty else 30.0)):
      return
    self._last_bar = now
    counts = {k: 0 for k in (state_lib.DONE, state_lib.RUNNING, state_lib.FAILED)}
    for s in states.values():
      if s.state in counts:
        counts[s.state] += 1
    total = len(states)
    width = 30
    filled = int(width * counts[state_lib.DONE] / max(total, 1))
    bar = "#" * filled + "-" * (width - filled)
    parts = []
    for r in self.running.values():
      step, step_time = state_lib.progress(state_lib.trial_dir(self.root, r.trial.id))
      steps = r.trial.info["steps"]
      seconds = progress_lib.eta_s(step, steps, step_time)
      eta = f" eta {seconds:.0f}s" if seconds is not None else ""
      parts.append(f"{r.trial.label} {step}/{steps}{eta}")
    others = counts[state_lib.RUNNING] - len(self.running)
    line = (f"[{bar}] {counts[state_lib.DONE]}/{total} done, {len(self.running)} running here"
            f"{f', {others} elsewhere' if others > 0 else ''}, {counts[state_lib.FAILED]} failed"
            f"{' | ' + '; '.join(parts) if parts else ''}")
    if tty:
      sys.stdout.write("\r" + line[:200].ljust(200) + ("\n" if force else ""))
      sys.stdout.flush()
    else:
      self.print(line)


def run_sweep(root: str, trials: Sequence[definition.Trial], opts: Options) -> int:
  """Runs a sweep's trials with signal handling; exit code 0 all done, 1 some failed, 42 stopped."""
  workdir_lib.makedirs(root)
  driver = Driver(root, trials, opts)

  def on_signal(signum, frame):  # pylint: disable=unused-argument
    driver.print(f"signal {signum}: stopping the running trials (they save and exit)")
    driver.stopping = True

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    states = driver.run()
  finally:
    if driver.running:
      driver.stop()
    for s, h in previous.items():
      signal.signal(s, h)
  if driver.stopping:
    return exit_codes.PREEMPTED
  if any(s.state == state_lib.FAILED for s in states.values()):
    return exit_codes.INTERNAL
  return exit_codes.OK
