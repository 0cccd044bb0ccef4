"""Scaling-law fits with their uncertainty: L(C), L(N, D), isoFLOP optima, hold-out checks.

Forms (per model family):
  power      L(C) = A * C^-alpha                  (a straight line on log-log axes, the paper's Fig. 1)
  saturating L(C) = E + A * C^-alpha              (irreducible loss E)
  chinchilla L(N, D) = E + A / N^alpha + B / D^beta (when the sweep varies N and D independently)

Fitting follows Hoffmann et al. (2022) with the corrections Besiroglu et al. (2024) found necessary:
a Huber loss (delta 1e-3) on log-loss residuals, bounded trust-region least squares from many starts on a grid (not one), the
objective scaled so the optimizer's tolerance is not hit before convergence, and convergence checked
and reported (gradient norm at the optimum, how many starts reached the best objective, parameters
at a bound). Intervals are percentile bootstraps over trials. The hold-out check refits without the
largest-compute trial and reports how far off its prediction is, and whether the truth lies in the
prediction's interval.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
from scipy import optimize
from scipy import special

from recurrentgemma_tpu import exit_codes
from recurrentgemma_tpu import workdir as workdir_lib

HUBER_DELTA = 1e-3
# The objective is scaled by this so that L-BFGS-B's absolute tolerances (ftol, gtol) are far below
# the differences that matter; Besiroglu et al. traced Chinchilla's unconverged fit to exactly this.
OBJECTIVE_SCALE = 1e4
AGREE_TOL = 1e-6  # starts whose scaled objective is within this of the best "agree"


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@dataclasses.dataclass(frozen=True)
class Form:
  """A scaling-law form in log space.

  `log_pred(theta, x)` predicts log loss from inputs x (columns: log C, or log N and log D, each
  centred by `shift`); `to_named` maps theta to the named parameters in original units.
  """

  name: str
  param_names: tuple[str, ...]
  log_pred: Callable[[np.ndarray, np.ndarray], np.ndarray]
  jac: Callable[[np.ndarray, np.ndarray], np.ndarray]  # d log_pred / d theta, [n, len(theta)]
  starts: Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
  bounds: tuple[tuple[float | None, float | None], ...]
  to_named: Callable[[np.ndarray, np.ndarray], dict[str, float]]


def _power_form() -> Form:
  # theta = (a, alpha): log L = a - alpha * x
  def log_pred(t, x):
    return t[0] - t[1] * x[:, 0]

  def jac(t, x):
    return np.stack([np.ones(len(x)), -x[:, 0]], axis=1)

  def starts(x, y):
    slope, icpt = np.polyfit(x[:, 0], y, 1) if len(set(x[:, 0])) > 1 else (0.0, float(np.mean(y)))
    return [np.array([icpt, -slope])] + [np.array([float(np.mean(y)), al])
                                         for al in (0.01, 0.05, 0.1, 0.3, 0.6)]

  def to_named(t, shift):
    # log A = a + alpha * shift (x = log C - shift).
    return {"A": float(np.exp(t[0] + t[1] * shift[0])), "alpha": float(t[1])}

  return Form("power", ("a", "alpha"), log_pred, jac, starts, ((None, None), (0.0, 5.0)), to_named)


def _saturating_form() -> Form:
  # theta = (e, a, alpha): log L = logsumexp(e, a - alpha * x)
  def log_pred(t, x):
    return np.logaddexp(t[0], t[1] - t[2] * x[:, 0])

  def jac(t, x):
    u = t[1] - t[2] * x[:, 0]
    total = np.logaddexp(t[0], u)
    pe, pu = np.exp(t[0] - total), np.exp(u - total)
    return np.stack([pe, pu, -x[:, 0] * pu], axis=1)

  def starts(x, y):
    lo = float(np.min(y))
    out = []
    for frac, alpha in itertools.product((0.0, 0.3, 0.6, 0.85, 0.95), (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)):
      e = lo + math.log(max(frac, 1e-3))
      rest = np.log(np.maximum(np.exp(y) - math.exp(e), 1e-6))
      a = float(np.mean(rest + alpha * x[:, 0]))
      out.append(np.array([e, a, alpha]))
    return out

  def to_named(t, shift):
    return {"E": float(np.exp(t[0])), "A": float(np.exp(t[1] + t[2] * shift[0])), "alpha": float(t[2])}

  return Form("saturating", ("e", "a", "alpha"), log_pred, jac, starts,
              ((None, None), (None, None), (0.0, 5.0)), to_named)


def _chinchilla_form() -> Form:
  # theta = (e, a, b, alpha, beta): log L = logsumexp(e, a - alpha * xN, b - beta * xD)
  def terms(t, x):
    return np.stack([np.full(len(x), t[0]), t[1] - t[3] * x[:, 0], t[2] - t[4] * x[:, 1]])

  def log_pred(t, x):
    return special.logsumexp(terms(t, x), axis=0)

  def jac(t, x):
    p = special.softmax(terms(t, x), axis=0)
    return np.stack([p[0], p[1], p[2], -x[:, 0] * p[1], -x[:, 1] * p[2]], axis=1)

  def starts(x, y):
    lo = float(np.min(y))
    out = []
    for frac, al, be in itertools.product((0.3, 0.7, 0.9), (0.1, 0.3, 0.6), (0.1, 0.3, 0.6)):
      e = lo + math.log(frac)
      rest = math.log(max(math.exp(lo) * (1 - frac) / 2, 1e-6))
      out.append(np.array([e, rest, rest, al, be]))
    return out

  def to_named(t, shift):
    return {"E": float(np.exp(t[0])), "A": float(np.exp(t[1] + t[3] * shift[0])),
            "B": float(np.exp(t[2] + t[4] * shift[1])), "alpha": float(t[3]), "beta": float(t[4])}

  return Form("chinchilla", ("e", "a", "b", "alpha", "beta"), log_pred, jac, starts,
              ((None, None),) * 3 + ((0.0, 5.0), (0.0, 5.0)), to_named)


FORMS = {"power": _power_form(), "saturating": _saturating_form(), "chinchilla": _chinchilla_form()}


@dataclasses.dataclass
class FitResult:
  form: str
  theta: np.ndarray
  shift: np.ndarray
  params: dict[str, float]
  objective: float
  converged: bool
  grad_norm: float
  starts: int
  starts_agreeing: int
  at_bound: list[str]
  n: int

  def summary(self) -> dict[str, Any]:
    return {"form": self.form, "params": self.params, "objective": self.objective,
            "converged": self.converged, "grad_norm": self.grad_norm, "starts": self.starts,
            "starts_agreeing": self.starts_agreeing, "at_bound": self.at_bound, "n": self.n}


def _objective(form: Form, x: np.ndarray, y: np.ndarray):
  """Scaled Huber objective and its analytic gradient (value, grad), for L-BFGS-B."""
  def f(t):
    r = form.log_pred(t, x) - y
    value = OBJECTIVE_SCALE * float(np.sum(huber(r)))
    # An element-wise sum, not `@`: a BLAS call per evaluation is slow on a busy multi-core host.
    grad = OBJECTIVE_SCALE * np.sum(np.clip(r, -HUBER_DELTA, HUBER_DELTA)[:, None] * form.jac(t, x),
                                    axis=0)
    return value, grad
  return f


def fit_form(form_name: str, x_raw: np.ndarray, loss: np.ndarray, *, n_starts: int = 32,
             rng: np.random.Generator | None = None, extra_starts: Sequence[np.ndarray] = ()
             ) -> FitResult:
  """Fits one form to inputs x_raw ([n, k] natural logs of C, or of N and D) and losses."""
  form = FORMS[form_name]
  x_raw = np.asarray(x_raw, float).reshape(len(loss), -1)
  y = np.log(np.asarray(loss, float))
  shift = x_raw.mean(axis=0)
  x = x_raw - shift
  f = _objective(form, x, y)
  rng = rng or np.random.default_rng(0)
  starts = list(extra_starts) + form.starts(x, y)
  # Jittered copies of the grid up to n_starts: many starts is the cheap defence against local minima.
  base = list(starts)
  while len(starts) < n_starts:
    s = base[len(starts) % len(base)]
    starts.append(s + rng.normal(0, 0.3, size=s.shape) * np.maximum(np.abs(s), 0.1))
  lower = np.array([-np.inf if lo is None else lo for lo, _ in form.bounds])
  upper = np.array([np.inf if hi is None else hi for _, hi in form.bounds])
  # Trust-region least squares with scipy's "huber" loss minimises the same objective as `f` (up to
  # the constant factor 2 / delta^2), on the residuals and Jacobian directly: tens of microseconds per
  # iteration for these few parameters, where L-BFGS-B on the summed objective took milliseconds.
  inside = 1e-9 * np.maximum(1.0, np.abs(np.where(np.isfinite(lower), lower, 0.0)))
  results = []
  for s in starts[:max(n_starts, len(extra_starts) + 1)]:
    s = np.clip(np.asarray(s, float), lower + inside, upper - inside)
    r = optimize.least_squares(lambda t: form.log_pred(t, x) - y, s, jac=lambda t: form.jac(t, x),
                               bounds=(lower, upper), loss="huber", f_scale=HUBER_DELTA,
                               method="trf", x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                               max_nfev=2000)
    r.fun = f(r.x)[0]
    results.append(r)
  best = min(results, key=lambda r: r.fun)
  agree = sum(abs(r.fun - best.fun) <= AGREE_TOL * max(1.0, abs(best.fun)) for r in results)
  at_bound = [n for n, v, (lo, hi) in zip(form.param_names, best.x, form.bounds)
              if (lo is not None and abs(v - lo) < 1e-6) or (hi is not None and abs(v - hi) < 1e-6)]
  g = f(best.x)[1]
  free = [i for i, n in enumerate(form.param_names) if n not in at_bound]
  grad_norm = float(np.linalg.norm(g[free])) if free else 0.0
  converged = bool(best.success or grad_norm < 1e-4) and grad_norm < 1e-2 and agree >= 2
  return FitResult(form_name, best.x, shift, form.to_named(best.x, shift), float(best.fun / OBJECTIVE_SCALE),
                   converged, grad_norm, len(results), int(agree), at_bound, len(loss))


def predict(fit: FitResult, x_raw: np.ndarray) -> np.ndarray:
  """Predicted loss at inputs x_raw (natural logs, like the fit's)."""
  x = np.asarray(x_raw, float).reshape(-1, len(fit.shift)) - fit.shift
  return np.exp(FORMS[fit.form].log_pred(fit.theta, x))


def bootstrap(form_name: str, x_raw: np.ndarray, loss: np.ndarray, fit: FitResult, *,
              n: int = 300, n_starts: int = 4, seed: int = 0) -> list[FitResult]:
  """Refits on resampled trials (with replacement), each warm-started at the full fit."""
  rng = np.random.default_rng(seed)
  x_raw = np.asarray(x_raw, float).reshape(len(loss), -1)
  k = len(FORMS[form_name].param_names)
  fits = []
  for _ in range(n):
    idx = rng.integers(0, len(loss), len(loss))
    if len({tuple(r) for r in x_raw[idx]}) < k:
      continue  # too few distinct points to determine the parameters
    fits.append(fit_form(form_name, x_raw[idx], np.asarray(loss)[idx], n_starts=n_starts, rng=rng,
                         extra_starts=[fit.theta]))
  return fits


def intervals(fits: Sequence[FitResult], level: float = 0.95) -> dict[str, tuple[float, float]]:
  if not fits:
    return {}
  lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  names = fits[0].params.keys()
  return {n: (float(np.percentile([f.params[n] for f in fits], lo)),
              float(np.percentile([f.params[n] for f in fits], hi))) for n in names}


def prediction_interval(fits: Sequence[FitResult], x_raw: np.ndarray,
                        level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  preds = np.stack([predict(f, x_raw) for f in fits])
  lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
  return np.percentile(preds, lo, axis=0), np.percentile(preds, hi, axis=0)


# ------------------------------------------------------------------------------------ a sweep


def _rows_by_family(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  out: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    if r.get("status") == "done" and r.get("final_eval_loss") is not None:
      out.setdefault(r.get("family") or "all", []).append(r)
  return out


def _varies_n_and_d(rows: Sequence[dict[str, Any]]) -> bool:
  ratio = np.log([r["tokens"] / r["params"] for r in rows])
  return len(rows) >= 6 and float(np.std(ratio)) > 0.1 and len({r["params"] for r in rows}) >= 3


def isoflop_optima(rows: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
  """Approach 2: per budget, a parabola in log N through the losses; its vertex is N*, D*."""
  out = []
  budgets = sorted({r["variables"].get("budget") for r in rows if r["variables"].get("budget")})
  for b in budgets:
    pts = [r for r in rows if r["variables"].get("budget") == b]
    if len(pts) < 3:
      continue
    ln = np.log([r["params"] for r in pts])
    ld = np.log([r["tokens"] for r in pts])
    loss = np.array([r["final_eval_loss"] for r in pts])
    c2, c1, c0 = np.polyfit(ln, loss, 2)
    if c2 <= 0:
      out.append({"budget": b, "n_opt": float("nan"), "d_opt": float("nan"), "loss_opt": float("nan"),
                  "note": "no minimum inside the profile (parabola opens downwards)"})
      continue
    v = -c1 / (2 * c2)
    d1, d0 = np.polyfit(ln, ld, 1)
    out.append({"budget": b, "n_opt": float(np.exp(v)), "d_opt": float(np.exp(d1 * v + d0)),
                "loss_opt": float(c0 + c1 * v + c2 * v * v),
                "inside": bool(ln.min() <= v <= ln.max())})
  return out


def fit_family(rows: Sequence[dict[str, Any]], *, n_bootstrap: int = 300, n_starts: int = 32,
               seed: int = 0) -> dict[str, Any]:
  """Every applicable fit of one family's finished trials."""
  rows = sorted(rows, key=lambda r: r["flops"])
  c = np.log([r["flops"] for r in rows])
  loss = np.array([r["final_eval_loss"] for r in rows])
  out: dict[str, Any] = {"n": len(rows), "flops": [r["flops"] for r in rows], "loss": loss.tolist()}
  forms = ["power"] + (["saturating"] if len(set(c)) >= 4 else [])
  for name in forms:
    k = len(FORMS[name].param_names)
    if len(set(c)) < k:
      continue
    full = fit_form(name, c, loss, n_starts=n_starts)
    boots = bootstrap(name, c, loss, full, n=n_bootstrap, seed=seed)
    entry = full.summary() | {"interval_95": intervals(boots), "bootstrap_used": len(boots),
                              "bootstrap_converged": sum(b.converged for b in boots)}
    entry["_fit"], entry["_boots"] = full, boots
    if name == "saturating" and full.params["E"] < 1e-3 * float(loss.min()):
      # E ran to 0: the data resolve no irreducible loss and the form is the power law again.
      entry["degenerate"] = "E -> 0: no irreducible loss resolvable; same as the power law"
    # Hold-out: fit without the largest-compute trial, predict it.
    if len(set(c[:-1])) >= k + 1:
      held = fit_form(name, c[:-1], loss[:-1], n_starts=n_starts)
      held_boots = bootstrap(name, c[:-1], loss[:-1], held, n=max(n_bootstrap // 4, 20), seed=seed + 1)
      pred = float(predict(held, c[-1:])[0])
      lo, hi = prediction_interval(held_boots, c[-1:]) if held_boots else ([math.nan], [math.nan])
      entry["holdout"] = {"flops": rows[-1]["flops"], "actual": float(loss[-1]), "predicted": pred,
                          "interval_95": [float(lo[0]), float(hi[0])],
                          "error": pred - float(loss[-1]),
                          "relative_error": (pred - float(loss[-1])) / float(loss[-1]),
                          "inside_interval": bool(lo[0] <= loss[-1] <= hi[0]),
                          "converged": held.converged}
    out[name] = entry
  if _varies_n_and_d(rows):
    x = np.log([[r["params"], r["tokens"]] for r in rows])
    full = fit_form("chinchilla", x, loss, n_starts=max(n_starts, 128))
    boots = bootstrap("chinchilla", x, loss, full, n=n_bootstrap, seed=seed)
    entry = full.summary() | {"interval_95": intervals(boots), "bootstrap_used": len(boots)}
    # Compute-optimal split under this family's FLOP model (FLOPs per token ~ k * N).
    k_fpt = float(np.median([r["flops_per_token"] / r["params"] for r in rows]))
    entry["flops_per_token_per_param"] = k_fpt
    entry["_fit"], entry["_boots"] = full, boots
    out["chinchilla"] = entry
  iso = isoflop_optima(rows)
  if iso:
    out["isoflop"] = iso
    good = [o for o in iso if math.isfinite(o["n_opt"])]
    if len(good) >= 2:
      a, b = np.polyfit(np.log([o["budget"] for o in good]), np.log([o["n_opt"] for o in good]), 1)
      out["isoflop_n_exponent"] = float(a)
      a, b = np.polyfit(np.log([o["budget"] for o in good]), np.log([o["d_opt"] for o in good]), 1)
      out["isoflop_d_exponent"] = float(a)
  return out


def fit_sweep(rows: Sequence[dict[str, Any]], **kwargs: Any) -> dict[str, dict[str, Any]]:
  return {fam: fit_family(rs, **kwargs) for fam, rs in sorted(_rows_by_family(rows).items())}


def _public(fits: dict[str, Any]) -> dict[str, Any]:
  """Drops the private FitResult objects before JSON."""
  if isinstance(fits, dict):
    return {k: _public(v) for k, v in fits.items() if not k.startswith("_")}
  if isinstance(fits, list):
    return [_public(v) for v in fits]
  return fits


def preferred_form(entry: dict[str, Any]) -> str:
  """`saturating` when it converged to a real irreducible loss, else `power`."""
  sat = entry.get("saturating")
  return "saturating" if sat and sat["converged"] and not sat.get("degenerate") else "power"


def predict_family(entry: dict[str, Any], flops: float) -> dict[str, Any]:
  """Predicted loss (and 95% interval) of one family at `flops`, from its preferred L(C) form."""
  name = preferred_form(entry)
  e = entry[name]
  x = np.array([math.log(flops)])
  pred = float(predict(e["_fit"], x)[0])
  lo, hi = prediction_interval(e["_boots"], x) if e["_boots"] else ([math.nan], [math.nan])
  return {"form": name, "flops": flops, "predicted_loss": pred, "interval_95": [float(lo[0]), float(hi[0])]}


def flops_for_loss(entry: dict[str, Any], loss: float, lo: float = 1e6, hi: float = 1e35) -> float | None:
  """The compute budget (FLOPs) at which a family's preferred L(C) fit predicts `loss`; None when
  the fit never reaches it (at or below its irreducible loss, or beyond 1e35 FLOPs)."""
  fit_ = entry[preferred_form(entry)]["_fit"]
  at = lambda c: float(predict(fit_, np.array([math.log(c)]))[0])
  if at(hi) > loss:
    return None
  if at(lo) <= loss:
    return lo
  a, b = math.log(lo), math.log(hi)
  for _ in range(200):  # bisection in log C: the fitted forms decrease with C
    m = 0.5 * (a + b)
    a, b = (m, b) if at(math.exp(m)) > loss else (a, m)
  return math.exp(b)


def format_report(fits: dict[str, Any]) -> str:
  lines = []
  for fam, entry in fits.items():
    lines.append(f"{fam}: {entry['n']} trials, FLOPs {min(entry['flops']):.3g} .. {max(entry['flops']):.3g}")
    for name in ("power", "saturating", "chinchilla"):
      if name not in entry:
        continue
      e = entry[name]
      ci = e["interval_95"]
      ps = ", ".join(f"{k}={v:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "")
                     for k, v in e["params"].items())
      conv = ("converged" if e["converged"] else "NOT converged") + (
          f" (|grad| {e['grad_norm']:.1e}, {e['starts_agreeing']}/{e['starts']} starts agree"
          f"{', at bound: ' + ','.join(e['at_bound']) if e['at_bound'] else ''}; "
          f"{e['bootstrap_used']} bootstrap fits)")
      lines.append(f"  {name:<10} {ps}  {conv}")
      if e.get("degenerate"):
        lines.append(f"  {'':<10} degenerate: {e['degenerate']}")
      h = e.get("holdout")
      if h:
        lines.append(f"  {'':<10} hold-out (largest, C={h['flops']:.3g}): predicted {h['predicted']:.4f} "
                     f"[{h['interval_95'][0]:.4f}, {h['interval_95'][1]:.4f}], actual {h['actual']:.4f}, "
                     f"error {h['error']:+.4f} ({100 * h['relative_error']:+.2f}%)"
                     f"{'' if h['inside_interval'] else ', OUTSIDE the interval'}")
    for o in entry.get("isoflop", []):
      lines.append(f"  isoFLOP C={o['budget']:.3g}: N*={o['n_opt']:.4g} D*={o['d_opt']:.4g} "
                   f"L*={o['loss_opt']:.4f}")
    if "isoflop_n_exponent" in entry:
      lines.append(f"  N* ~ C^{entry['isoflop_n_exponent']:.3f}, D* ~ C^{entry['isoflop_d_exponent']:.3f}")
  return "\n".join(lines)


def main(root: str, sweep: Any, *, predict: float = 0.0, n_bootstrap: int = 300,
         n_starts: int = 32, target_loss: float = 0.0,
         pricing: Callable[[float], str] | None = None) -> int:
  """`python -m launch.sweep fit`: fits, prints, writes ROOT/fit.json (and a prediction record).

  `target_loss`: also prints each family's compute budget to reach that loss; `pricing(flops)`
  (launch/cost.py through the command) the cost of each budget printed."""
  from launch.sweep import report  # pylint: disable=g-import-not-at-top
  rows = report.read_results(root)
  fits = fit_sweep(rows, n_bootstrap=n_bootstrap, n_starts=n_starts)
  if not fits:
    raise exit_codes.UserError(f"{root}: no finished trials with an eval loss; run `collect` "
                               "after `run`")
  print(format_report(fits))
  workdir_lib.write_text(workdir_lib.join(root, "fit.json"),
                         json.dumps(_public(fits), indent=1, default=float))
  if predict:
    record = {"time": time.time(), "sweep": sweep.name, "flops": predict,
              "code_version": report.code_version(),
              "predictions": {fam: predict_family(e, predict) for fam, e in fits.items()}}
    for fam, p in record["predictions"].items():
      print(f"prediction {fam} at C={predict:.3g}: loss {p['predicted_loss']:.4f} "
            f"[{p['interval_95'][0]:.4f}, {p['interval_95'][1]:.4f}] ({p['form']} fit)")
    path = workdir_lib.join(root, "predictions", f"{int(record['time'])}_{predict:.3g}.json")
    workdir_lib.write_json(path, record)
    print(f"recorded {path}")
    if pricing is not None:
      print(f"cost at C={predict:.3g}: {pricing(predict)}")
  if target_loss:
    for fam, entry in fits.items():
      c = flops_for_loss(entry, target_loss)
      if c is None:
        print(f"target loss {target_loss:g} {fam}: not reached by the {preferred_form(entry)} fit "
              "(at or below its irreducible loss)")
        continue
      print(f"target loss {target_loss:g} {fam}: C={c:.4g} FLOPs ({preferred_form(entry)} fit)"
            + (f"; cost {pricing(c)}" if pricing is not None else ""))
  return exit_codes.OK
