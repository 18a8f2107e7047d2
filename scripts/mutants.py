"""Hand-written mutants of qprune's core modules, each run against the tests that should catch it.

    python scripts/mutants.py                  # every mutant; a table of killed / survived / stale
    python scripts/mutants.py --list           # the mutants, and the test files each one runs
    python scripts/mutants.py -k rewind -k gray   # only mutants whose name contains one of these
    python scripts/mutants.py --json out.json  # also write the results as JSON

A mutant is a realistic bug written down as (file, an exact snippet of it, what to put instead),
with the few test files that ought to catch it. The repository's src/, tests/, conf/, scripts/ and
pyproject.toml are copied to a temporary directory once; each mutant is applied there, its test
files run (``pytest -x -q``, one thread, no bytecode cache, PYTHONPATH = the copy's src/ so that
``python -m qprune`` subprocesses run the mutant too), and the file is put back. The working tree
is never touched.

Outcomes: ``killed`` (a test failed), ``survived`` (all passed: a test is missing, or the mutant is
harmless — docs/testing.md argues each survivor), ``timeout`` (counted as killed), ``stale`` (the
snippet is no longer in the file, or is there more than once: the code moved on; fix the mutant),
``invalid`` (the mutated file does not compile). Score = killed / (killed + survived).
The unmutated tests run first (``--no-baseline`` skips that); a failure there stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED = ("src", "tests", "conf", "scripts", "pyproject.toml")

QUAT, PRUNING, TRAINING = "src/qprune/quaternion.py", "src/qprune/pruning.py", "src/qprune/training.py"
PROTOCOLS, RUNNER = "src/qprune/protocols.py", "src/qprune/runner.py"
PIPELINE, STORE, LEVELS = "src/qprune/data/pipeline.py", "src/qprune/store.py", "src/qprune/levels.py"
FILES = "src/qprune/files.py"  # the store's atomic writes
COMPARE = "scripts/compare_results.py"
DENSITY = "src/qprune/layer_density.py"

# Test files, cheapest first (-x stops at the first failure).
T_QUAT, T_PRUNING, T_STORE = "tests/test_quaternion.py", "tests/test_pruning.py", "tests/test_store.py"
T_ORACLES, T_PROTOCOLS, T_DATA = "tests/test_oracles.py", "tests/test_protocols.py", "tests/test_data.py"
T_TRIALS, T_CLI, T_FIDELITY = "tests/test_trials.py", "tests/test_cli.py", "tests/test_fidelity.py"
T_COMPARE = "tests/test_compare_results.py"
T_REPORTING = "tests/test_reporting.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str   # what a researcher would see go wrong


MUTANTS = [
    # ---------------------------------------------------------------- quaternion algebra
    Mutant("quat-sign-table", QUAT, "    (1.0, 1.0, -1.0, 1.0),\n", "    (1.0, 1.0, 1.0, 1.0),\n", (T_QUAT,),
           "one sign of the Hamilton block flipped: not a quaternion product"),
    Mutant("quat-cyclic-table", QUAT, "component = a[:, None] ^ a[None, :]", "component = (a[:, None] + a[None, :]) % 4",
           (T_QUAT,), "component table of Z4 instead of the Klein four-group"),
    Mutant("quat-backward-unsigned", QUAT, "signed = (grad.transpose(1, 2) * sign.view(4, 4, 1, 1)).reshape(16, m * nk)",
           "signed = grad.transpose(1, 2).reshape(16, m * nk)", (T_QUAT,), "CPU backward forgets the signs"),
    Mutant("quat-init-sigma", QUAT, 'sigma = 1.0 / math.sqrt((2.0 if scheme == "he" else 8.0) * fan_in)',
           'sigma = 1.0 / math.sqrt((1.0 if scheme == "he" else 8.0) * fan_in)', (T_QUAT,), "He initialisation 1.41x too large"),
    Mutant("quat-init-study-sigma", QUAT, 'sigma = 1.0 / math.sqrt((2.0 if scheme == "he" else 8.0) * fan_in)',
           'sigma = 1.0 / math.sqrt((2.0 if scheme == "he" else 4.0) * fan_in)', (T_FIDELITY, T_QUAT),
           "algebra.init=study at another scale than the original code's"),
    Mutant("quat-init-study-kernel-area", QUAT,
           "return in_quaternions * (kernel_size if isinstance(kernel_size, int) else math.prod(kernel_size))",
           "return in_quaternions * (kernel_size ** 2 if isinstance(kernel_size, int) else math.prod(kernel_size))",
           (T_FIDELITY, T_QUAT), "algebra.init=study counts a 3x3 conv's fan-in as 9, not the original's 3"),
    Mutant("quat-init-fan-in", QUAT, "fan_in = self.weight.shape[2] * math.prod(self.weight.shape[3:])",
           "fan_in = self.weight.shape[2]", (T_QUAT,), "conv fan-in without the kernel area"),
    Mutant("quat-init-axis", QUAT, "axis = axis / axis.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)",
           "axis = axis / 3 ** 0.5", (T_QUAT,), "imaginary axis not a unit vector (only on average)"),
    Mutant("quat-grouped-conv", QUAT, "x = x.view(n, 4, g, gin, h, w).transpose(1, 2).reshape(n, 4 * g * gin, h, w)",
           "x = x.view(n, 4, g, gin, h, w).reshape(n, 4 * g * gin, h, w)", (T_QUAT,),
           "grouped quaternion conv mixes components across groups"),
    # ---------------------------------------------------------------- pruning
    Mutant("prune-whole-quaternion-norm", PRUNING, "return weight.norm(dim=0).flatten() / n**0.5, mask.all(dim=0).flatten(), n",
           "return weight.norm(dim=0).flatten(), mask.all(dim=0).flatten(), n", (T_PRUNING, T_ORACLES),
           "|q| instead of |q|/2: pruning shifts from the quaternion layers to the real head"),
    Mutant("prune-signed-magnitude", PRUNING, "return weight.abs().flatten(), mask.flatten(), 1",
           "return weight.flatten(), mask.flatten(), 1", (T_PRUNING, T_ORACLES), "ranks signed values, not magnitudes"),
    Mutant("prune-rate-of-all", PRUNING, "to_remove = round(rate * float((sizes * alive).sum()))",
           "to_remove = round(rate * float(sizes.sum()))", (T_PRUNING, T_ORACLES),
           "rate of all weights, not of the remaining ones"),
    Mutant("prune-keep-off-by-one", PRUNING, "keep_sorted = alive[order] & (removed_so_far > to_remove)",
           "keep_sorted = alive[order] & (removed_so_far >= to_remove)", (T_PRUNING, T_ORACLES),
           "one weight too few removed per pool"),
    Mutant("prune-scope-swapped", PRUNING, 'key = settings.rate_of(w.layer_type) if settings.scope == "global" else w.name',
           'key = settings.rate_of(w.layer_type) if settings.scope == "layerwise" else w.name', (T_PRUNING, T_ORACLES),
           "global and layerwise swapped"),
    Mutant("prune-pool-per-type", PRUNING, 'key = settings.rate_of(w.layer_type) if settings.scope == "global" else w.name',
           'key = w.layer_type if settings.scope == "global" else w.name', (T_PRUNING, T_ORACLES),
           "the global pool split by layer type (conv / fc / output ranked apart)"),
    Mutant("prune-type-rate-ignored", PRUNING, "rate = settings.rate_of(pool[0].layer_type)", "rate = settings.rate",
           (T_PRUNING, T_ORACLES), "per-layer-type rates ignored"),
    Mutant("prune-output-always", PRUNING, "            if include_output:\n", "            if True:\n", (T_PRUNING,),
           "prune.output=false still prunes the head"),
    Mutant("prune-random-count", PRUNING, "keep[torch.topk(scores.flatten(), int(mask.sum())).indices] = True",
           "keep[torch.topk(scores.flatten(), int(mask.sum()) - 1).indices] = True", (T_PRUNING, T_ORACLES),
           "random-pruning baseline one weight sparser per layer"),
    # (believed harmless: kept to show what the tests cannot tell apart, argued in docs/testing.md)
    Mutant("prune-quaternion-alive-any", PRUNING, "mask.all(dim=0).flatten(), n", "mask.any(dim=0).flatten(), n",
           (T_PRUNING, T_ORACLES), "a quaternion counts as alive when any component is (masks prune whole quaternions)"),
    Mutant("prune-unstable-sort", PRUNING, "torch.full_like(scores, -1.0)), stable=True)", "torch.full_like(scores, -1.0)), stable=False)",
           (T_PRUNING, T_ORACLES), "ties among equal scores broken in another order"),
    Mutant("prune-dead-score-zero", PRUNING, "torch.full_like(scores, -1.0)", "torch.full_like(scores, 0.0)",
           (T_PRUNING, T_ORACLES), "pruned units score 0 instead of -1 before sorting"),
    # ---------------------------------------------------------------- training (the rules pruning relies on)
    Mutant("train-gradients-unmasked", TRAINING, "            _mask_gradients(masked_params, float_masks)\n", "",
           (T_PRUNING, T_ORACLES), "pruned weights come back to life"),
    Mutant("train-carried-moments-unmasked", TRAINING, "if masks is not None and name in masks:", "if False:",
           (T_PROTOCOLS,), "phase A's carried moments move freshly pruned weights"),
    # ---------------------------------------------------------------- protocols
    Mutant("lth-no-rewind", PROTOCOLS, "            t.model.load_state_dict(t.rewind)\n            level_masks.apply_(t.model)",
           "            level_masks.apply_(t.model)", (T_ORACLES,), "IMP silently becomes iterative fine-tuning"),
    Mutant("lth-prunes-the-initialisation", PROTOCOLS, "            t.model.load_state_dict(previous_weights)\n",
           "            t.model.load_state_dict(t.init)\n", (T_ORACLES,), "masks ranked on the initial weights"),
    Mutant("lth-masks-not-nested", PROTOCOLS, "prune(t.model, Masks(previous_masks).to(c.device), c.weights, c.settings.prune)",
           "prune(t.model, Masks.ones(t.model, c.weights), c.weights, c.settings.prune)", (T_ORACLES,),
           "each level prunes 20% of all weights afresh"),
    Mutant("paper-optimizer-reset", PROTOCOLS, 'optimizers = [state["optimizer"] for state in states]', "optimizers = None",
           (T_PROTOCOLS,), "phase A's optimizer reset every round"),
    Mutant("paper-phase-a-rewinds", PROTOCOLS, '                t.model.load_state_dict(state["weights"])\n',
           "                t.model.load_state_dict(t.init)\n", (T_PROTOCOLS,), "phase A restarts each round from the init"),
    Mutant("paper-phase-b-no-reset", PROTOCOLS,
           "            t.model.load_state_dict(t.init)\n            m = Masks.ones(t.model, c.weights) if level == 0",
           "            m = Masks.ones(t.model, c.weights) if level == 0", (T_PROTOCOLS,),
           "phase B trains from phase A's weights, not the initialisation"),
    Mutant("paper-round-0-from-init", PROTOCOLS, "self._save_round(t, 0, masks, copy_state(t.model.state_dict()), optimizer, training)",
           "self._save_round(t, 0, masks, copy_state(t.init), optimizer, training)", (T_PROTOCOLS,),
           "the shared round 0 hands phase A the untrained weights"),
    Mutant("stop-when-any-run-stops", PROTOCOLS, 'return all(_below([rec["row"] for rec in r], n, settings.stop_below) for r in records)',
           'return any(_below([rec["row"] for rec in r], n, settings.stop_below) for r in records)',
           (T_PROTOCOLS,), "trials stop when the first run meets the rule"),
    Mutant("stop-after-one-level", PROTOCOLS, "n = settings.stop_after if after is None else after",
           "n = 1 if after is None else after", (T_PROTOCOLS,), "stops after one level below the threshold, not stop_after"),
    Mutant("paper-carry-restarts-phase-b", PROTOCOLS, "        if not self.p.carry or level == 0:\n            return None\n",
           "        return None\n", (T_FIDELITY,), "phase_b_optimizer=carry silently trains phase B with fresh optimizers"),
    Mutant("paper-carry-level-1-from-round-1", PROTOCOLS,
           '            return [self._state(t, last)["optimizer"] for t in self.ctx.trials]',
           '            return [self._state(t, 1)["optimizer"] for t in self.ctx.trials]', (T_FIDELITY,),
           "carry: phase B's level 1 continues from round 1's optimizer, not phase A's last"),
    Mutant("baseline-prune-keeps-ticket-masks", PROTOCOLS,
           "                m = random_masks_like(m, ctx.generator(t.s.seed, level, stream=1 + BASELINES.index(baseline)))\n", "",
           (T_ORACLES, T_PROTOCOLS), "random_prune is the ticket"),
    Mutant("baseline-reinit-is-init", PROTOCOLS, "                t.model.load_state_dict(t.reinit)\n",
           "                t.model.load_state_dict(t.init)\n", (T_ORACLES, T_PROTOCOLS), "random_reinit starts from the ticket's init"),
    Mutant("baseline-prune-from-init", PROTOCOLS, "                t.model.load_state_dict(protocol.start_weights(t))\n",
           "                t.model.load_state_dict(t.init)\n", (T_ORACLES, T_PROTOCOLS),
           "random_prune starts from the init, not the ticket's rewind point"),
    Mutant("baseline-other-data-order", PROTOCOLS,
           "trainings = ctx.trainer.train_level(level_masks, ctx.generators(level), observers)",
           "trainings = ctx.trainer.train_level(level_masks, ctx.generators(level + 1), observers)",
           (T_ORACLES, T_PROTOCOLS), "baselines train on another data order than the ticket"),
    Mutant("baseline-init-seed", PROTOCOLS, "return seed + 1_000_003", "return seed", (T_ORACLES, T_PROTOCOLS),
           "random_reinit's 'fresh' initialisation is the run's own"),
    # ---------------------------------------------------------------- runner and levels
    Mutant("level-order-forgets-level", LEVELS, "manual_seed(seed * 100_003 + level + stream * 1_000_000_007)",
           "manual_seed(seed * 100_003 + stream * 1_000_000_007)", (T_ORACLES,), "the same data order at every level"),
    Mutant("rewind-snapshot-late", RUNNER, "        if step == self.rewind_step:\n", "        if step == self.rewind_step + 1:\n",
           (T_ORACLES,), "prune.rewind=Nit keeps the weights after N+1 steps"),
    Mutant("rewind-resumes-from-init", RUNNER, 't.rewind = t.init if self.rewind_step == 0 else t.store.load_checkpoint("rewind")',
           "t.rewind = t.init", (T_ORACLES,), "a resumed run with a late rewind point rewinds to the init"),
    Mutant("keep-last-drops-the-newest", RUNNER, "                t.store.drop_weights(level - 1)",
           "                t.store.drop_weights(level)", (T_ORACLES,), "save.weights=last deletes the weights it must keep"),
    Mutant("trials-share-one-seed", RUNNER, "Trial(k, replace(settings, seed=settings.seed + k)",
           "Trial(k, replace(settings, seed=settings.seed)", (T_TRIALS,), "trials=K runs one seed K times"),
    Mutant("trials-share-one-init", RUNNER, "torch.manual_seed(t.s.seed)  # run k's", "torch.manual_seed(s.seed)  # run k's",
           (T_TRIALS,), "trials=K share the first run's initialisation"),
    Mutant("resume-retrains-finished-runs", RUNNER,
           "            if len(t.records) > level:\n                continue  # finished in an earlier session (a resumed run ahead of the others): keep that result\n",
           "", (T_TRIALS,), "a resumed trials run overwrites levels it had finished"),
    Mutant("nonzero-count-without-biases", RUNNER, "params_nonzero = params_total - (masks.total() - masks.kept())",
           "params_nonzero = masks.kept()", (T_CLI,), "pct_of_real without the unpruned biases"),
    # ---------------------------------------------------------------- data pipeline
    Mutant("gray-0.3", PIPELINE, "GRAY_WEIGHTS = (0.2989, 0.587, 0.114)", "GRAY_WEIGHTS = (0.3, 0.587, 0.114)",
           (T_ORACLES, T_DATA), "rounded luma weights"),
    Mutant("gray-bgr", PIPELINE, "GRAY_WEIGHTS = (0.2989, 0.587, 0.114)", "GRAY_WEIGHTS = (0.114, 0.587, 0.2989)",
           (T_ORACLES, T_DATA), "luma weights in BGR order"),
    Mutant("gray-from-raw-pixels", PIPELINE,
           "        x = x.float() * self._scale + self._shift\n        if self.add_gray:\n            x = torch.cat((x, (x * self._gray)",
           "        raw = x.float() / 255\n        x = x.float() * self._scale + self._shift\n        if self.add_gray:\n"
           "            x = torch.cat((x, (raw * self._gray)", (T_ORACLES, T_DATA), "gray from [0, 1] pixels, not normalised ones"),
    Mutant("normalise-without-std", PIPELINE, "self._scale, self._shift = 1.0 / (255.0 * std), -mean / std",
           "self._scale, self._shift = 1.0 / (255.0 * std), -mean", (T_ORACLES, T_DATA), "mean not divided by std"),
    Mutant("shuffle-with-global-rng", PIPELINE, "order = torch.randperm(len(split), generator=generator, device=self.device)",
           "order = torch.randperm(len(split), device=self.device)", (T_ORACLES,), "data order not reproducible"),
    Mutant("labels-not-shuffled", PIPELINE, "return Split(self.augment_batch(split.x[order], generator), split.y[order])",
           "return Split(self.augment_batch(split.x[order], generator), split.y)", (T_ORACLES,), "labels left behind"),
    Mutant("epoch-not-augmented", PIPELINE, "return Split(self.augment_batch(split.x[order], generator), split.y[order])",
           "return Split(split.x[order], split.y[order])", (T_ORACLES, T_DATA), "augment=crop_flip never reaches training"),
    Mutant("flip-always", PIPELINE, "flip = torch.rand(b, generator=generator, device=x.device) < 0.5",
           "flip = torch.rand(b, generator=generator, device=x.device) < 1.0", (T_ORACLES, T_DATA), "every image mirrored"),
    Mutant("crop-misses-last-offset", PIPELINE, "shift = torch.randint(0, 2 * padding + 1, (2, b)",
           "shift = torch.randint(0, 2 * padding, (2, b)", (T_ORACLES, T_DATA), "crops never shift by the full padding"),
    Mutant("validation-inside-train", PIPELINE, "    remaining = order[: len(train) - n_val]\n", "    remaining = order\n",
           (T_DATA,), "validation images are trained on"),
    Mutant("drop-last-ignored", PIPELINE, "stop = len(split) - len(split) % batch_size if drop_last else len(split)",
           "stop = len(split)", (T_DATA,), "train.drop_last=true still trains the partial batch"),
    # ---------------------------------------------------------------- run directory
    Mutant("store-non-atomic", FILES,
           '        with open(tmp, "wb") as f:\n            f.write(data)\n            f.flush()\n            os.fsync(f.fileno())\n'
           '        os.replace(tmp, path)\n',
           '        with open(path, "wb") as f:\n            f.write(data)\n',
           (T_STORE, T_ORACLES), "a crash leaves a half file under the final name"),
    Mutant("store-result-first", STORE,
           '        directory = self.level_dir(level)\n        files = {"masks.pt": atomic_save(',
           '        directory = self.level_dir(level)\n        write_json(directory / "result.json", record)\n'
           '        files = {"masks.pt": atomic_save(',
           (T_STORE, T_ORACLES), "a level looks finished before its weights are on disk"),
    Mutant("store-unpack-from-the-end", STORE, "masks[name] = flat[: shape.numel()].view(shape)",
           "masks[name] = flat[-shape.numel():].view(shape)", (T_STORE,), "masks read back shifted by the padding bits"),
    Mutant("store-identity-unchecked", STORE, "            if previous != identity:\n", "            if False:\n",
           (T_CLI,), "a different run resumes into the directory"),
    Mutant("store-restart-keeps-levels", STORE,
           "                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)\n", "                pass\n",
           (T_CLI, T_ORACLES), "resume=false keeps the old levels"),
    Mutant("store-drops-the-new-round-state", STORE, '(self.round_dir(round_ - 1) / "state.pt").unlink(missing_ok=True)',
           '(self.round_dir(round_) / "state.pt").unlink(missing_ok=True)', (T_PROTOCOLS,),
           "phase A cannot continue after a restart"),
    Mutant("store-unpickles", STORE, 'return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)',
           'return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)', (T_STORE, T_ORACLES),
           "loading a run file can run arbitrary code"),
    # ---------------------------------------------------------------- evaluation and reports
    Mutant("eval-chunk-ignored", TRAINING, "for x, y in data.batches(split, eval_batch_size(batch_size, data.device)):",
           "for x, y in data.batches(split, batch_size):", (T_ORACLES,), "the CPU evaluates 1,000 images at a time (slower)"),
    Mutant("compare-first-crossing", COMPARE, "    for (x0, g0), (x1, g1) in zip(zip(grid, gaps), zip(grid[1:], gaps[1:])):",
           "    for (x0, g0), (x1, g1) in reversed(list(zip(zip(grid, gaps), zip(grid[1:], gaps[1:])))):",
           (T_COMPARE,), "the lead is read from the dense end: the first crossing, not the last"),
    Mutant("compare-se-ignores-n", COMPARE, "se = None if sa is None or sb is None else math.sqrt(sa ** 2 / na + sb ** 2 / nb)",
           "se = None if sa is None or sb is None else math.sqrt(sa ** 2 + sb ** 2)", (T_COMPARE,),
           "the standard error of a change ignores how many seeds each mean has"),
    Mutant("layer-density-rounds-win", STORE,
           "return self.load_masks(level) if self.level_finished(level) else self.load_round_masks(level)",
           "return self.load_round_masks(level) if (self.round_dir(level) / \"masks.pt\").is_file() else self.load_masks(level)",
           (T_REPORTING,), "a level's layer shares read from phase A's round instead of the masks the level trained"),
    Mutant("layer-density-levels-only", DENSITY, "return list(range(max(store.finished_level_count(), store.finished_rounds())))",
           "return list(range(store.finished_level_count()))", (T_REPORTING,), "a paper run still in phase A shows no layer shares"),
]


def copy_repository(destination: Path) -> None:
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache"))
        elif source.is_file():
            shutil.copy2(source, destination / name)


def environment(copy: Path) -> dict[str, str]:
    data = os.environ.get("QPRUNE_TEST_DATA", str((REPO.parent / "shared" / "data").resolve()))
    return {**os.environ, "PYTHONPATH": str(copy / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "QPRUNE_TEST_DATA": data, "QPRUNE_DATA": data}


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, float]:
    """(passed | failed | timeout, the first failing test, seconds)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - start
    seconds = time.perf_counter() - start
    if result.returncode == 0:
        return "passed", "", seconds
    failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", result.stdout, re.MULTILINE)
    return "failed", failed.group(1) if failed else (result.stdout + result.stderr).strip()[-300:], seconds


def try_mutant(copy: Path, mutant: Mutant, timeout: float) -> dict:
    path = copy / mutant.file
    original = path.read_text() if path.is_file() else ""
    result = {"name": mutant.name, "file": mutant.file, "bug": mutant.bug, "tests": list(mutant.tests), "caught_by": "", "seconds": 0.0}
    if original.count(mutant.old) != 1:
        found = original.count(mutant.old)
        return {**result, "outcome": "stale", "caught_by": f"snippet found {found} times"}
    path.write_text(original.replace(mutant.old, mutant.new))
    try:
        try:
            compile(path.read_text(), str(path), "exec")
        except SyntaxError as exc:
            return {**result, "outcome": "invalid", "caught_by": f"{exc.msg} (line {exc.lineno})"}
        status, caught_by, seconds = run_tests(copy, mutant.tests, timeout)
    finally:
        path.write_text(original)
    outcome = {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status]
    return {**result, "outcome": outcome, "caught_by": caught_by, "seconds": round(seconds, 1)}


def score(results: list[dict]) -> tuple[int, int, float]:
    killed = sum(r["outcome"] in ("killed", "timeout") for r in results)
    survived = sum(r["outcome"] == "survived" for r in results)
    return killed, survived, killed / max(killed + survived, 1)


def table(results: list[dict]) -> str:
    lines = ["| mutant | file | outcome | caught by | s |", "| --- | --- | --- | --- | ---: |"]
    for r in results:
        lines.append(f"| {r['name']} | {r['file'].removeprefix('src/qprune/')} | {r['outcome']} | {r['caught_by']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[], help="only mutants whose name contains this (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant (default 900)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.k or any(k in m.name for k in args.k)]
    if not mutants:
        parser.error(f"no mutant's name contains {' or '.join(map(repr, args.k))} (--list shows them)")
    if args.list:
        for m in mutants:
            print(f"{m.name:36} {m.file.removeprefix('src/qprune/'):18} {' '.join(t.removeprefix('tests/') for t in m.tests)}  — {m.bug}")
        return 0
    with tempfile.TemporaryDirectory(prefix="qprune-mutants-") as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            status, failing, seconds = run_tests(copy, tests, args.timeout * 2)
            print(f"baseline ({len(tests)} test files): {status} in {seconds:.0f} s {failing}", flush=True)
            if status != "passed":
                print("the unmutated tests must pass first", file=sys.stderr)
                return 1
        results = []
        for i, mutant in enumerate(mutants, 1):
            result = try_mutant(copy, mutant, args.timeout)
            results.append(result)
            print(f"[{i}/{len(mutants)}] {mutant.name}: {result['outcome']} ({result['seconds']:.0f} s) {result['caught_by']}", flush=True)
    killed, survived, ratio = score(results)
    stale = [r["name"] for r in results if r["outcome"] in ("stale", "invalid")]
    print(f"\nscore: {killed}/{killed + survived} killed ({100 * ratio:.0f}%)" + (f"; stale or invalid: {', '.join(stale)}" if stale else ""))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"killed": killed, "survived": survived, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
