"""Plan and run variants x seeds x backbones; resumable; one shared stage-1 teacher per stage-1 key.

Layout of OUT:

    experiment_config.yaml            the settings, the profile, every variant's overrides, the runs
    <backbone>/teacher/seed<S>/       stage-1 teacher + fusion fit (last_phase="fusion"): the `mil` row
    <backbone>/teacher-<v>/seed<S>/   a teacher of its own, for variants that change stage-1 settings
    <backbone>/<variant>/seed<S>/     stage 2 from the shared teacher (first_phase="distill"); for the
                                      comparison rows (oeem, oaa, pistoseg, supervised-unet: another
                                      `method`) one standalone run of that method, reported as "segnet"
    table.md, table.csv, table.json   test scores, mean ± std over seeds (see `tables`)
    plots/<backbone>-<group>.png      validation / test F1 against epoch (see `plots`)
    plots/<backbone>-pseudo-masks.png validation images: truth, CAM pseudo-masks, MIL teacher, IKD student
                                      (when a CAM row and mil / ikd have finished a common seed)

A run is finished when its `experiment_run.json` exists: it is written atomically after the
pipeline has written its models and results.json, so an interrupted run is resumed from its
checkpoint on the next call and a finished one is skipped. Variants whose configs are equal share
one run (`kd-fusion` and `wce-0.25` are `ikd`, `wce-0` is `no-wce`), in the folder of the first
registered variant with that config, whatever was asked for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ikdmil.config import RunConfig
from ikdmil.errors import IkdmilError
from ikdmil.experiment.variants import (
    PROFILES,
    STAGE2_FIELDS,
    TEACHER_LOSS_BY_BACKBONE,
    VARIANTS,
    apply_overrides,
    comparable,
    config_fields,
    is_method_run,
    missing_fields,
    profile_config,
    run_key,
    stage1_key,
)
from ikdmil.io import write_text

log = logging.getLogger(__name__)

MARKER = "experiment_run.json"


@dataclass
class ExperimentSettings:
    """`ikdmil experiment` options (the CLI is built from these fields and their `help`)."""

    data: str = field(metadata={"help": "prepared dataset: manifest CSV or folder (train, val and test splits)",
                                "positional": True})
    out: str = field(metadata={"help": "experiment folder (runs, tables, plots); rerun to resume"})
    profile: str = field(default="cpu", metadata={"help": "schedule: " + ", ".join(
        f"{p.name} ({p.help})" for p in PROFILES.values())})
    variants: str = field(default="mil,ikd",
                          metadata={"help": "comma-separated variants, or 'all': " + ", ".join(VARIANTS)})
    seeds: int = field(default=3, metadata={"help": "number of seeds"})
    seed_start: int = field(default=0, metadata={"help": "first seed (seeds are seed_start, seed_start + 1, ...)"})
    backbones: str = field(default="", metadata={"help": "comma-separated backbones for Table 2 rows; each baseline "
                                                          "teacher uses its own MIL loss "
                                                          "(default: the profile's, vgg16)"})
    teacher_loss: str = field(default="auto", metadata={"help": "stage-1 loss: auto (the backbone's paper: dice for "
                                                                 "vgg16, gem for the baselines) | dice | gem"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    workers: int = field(default=0, metadata={"help": "DataLoader worker processes per run"})
    cache_dir: str = field(default="", metadata={"help": "preprocessing cache (default: OUT/cache)"})
    bin_width: int = field(default=0, metadata={"help": "plots: best of each N epochs (default: the swap_every)"})
    set: list = field(default_factory=list, metadata={"help": "RunConfig override KEY=VALUE on top of the profile "
                                                              "(repeatable), e.g. --set batch_size=8"})
    verbose: bool = field(default=False, metadata={"help": "show every run's epochs and progress bars"})


@dataclass
class Job:
    kind: str  # "teacher" (stage 1 + fusion fit), "distill", or "method" (a comparison row's standalone run)
    backbone: str
    seed: int
    cfg: RunConfig
    variants: list[str]  # the variants this run reports
    teacher: Job | None = None
    users: list[Job] = field(default_factory=list)  # teacher jobs: the distill jobs reading it

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def key(self) -> str:
        """What the run computes: a teacher's stage-1 settings, a distillation's whole config."""
        return stage1_key(self.cfg) if self.kind == "teacher" else run_key(self.cfg)

    def finished(self) -> bool:
        return (self.run_dir / MARKER).is_file()

    def label(self) -> str:
        if self.kind == "teacher":
            return f"{self.backbone} teacher seed {self.seed} (for {', '.join(self.variants)})"
        names = self.variants[0] + (f" (= {', '.join(self.variants[1:])})" if len(self.variants) > 1 else "")
        return f"{self.backbone} {names} seed {self.seed}"


def _split(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def _parse_set(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> typed RunConfig overrides."""
    types = {f.name: type(f.default) for f in dataclasses.fields(RunConfig)}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise IkdmilError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(types))}")
        kind = types[key]
        try:
            if kind is bool:
                if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(text)
                value = text.lower() in ("1", "true", "yes", "on")
            else:
                value = kind(text)
        except ValueError:
            raise IkdmilError(f"--set {item!r}: {key} takes a {kind.__name__}") from None
        out[key] = value
    return out


def _check_data(data: str) -> str:
    from ikdmil.data.manifest import load_samples, select_split

    path = Path(data).expanduser()
    if not str(data) or not path.exists():
        raise IkdmilError(f"{data or 'DATA'}: dataset not found; prepare one with `ikdmil prepare` (or `ikdmil synth`)")
    samples = load_samples(path)
    select_split(samples, "train", path, need_both=True)
    select_split(samples, "val", path, need_both=False)
    select_split(samples, "test", path, need_both=False)  # the tables report the test split
    return str(path.resolve())


class Plan:
    """Every run of an experiment, checked before any work."""

    def __init__(self, settings: ExperimentSettings):
        from ikdmil.models import available_backbones

        s = settings
        self.settings = s
        if s.profile not in PROFILES:
            raise IkdmilError(f"unknown profile {s.profile!r}; choose one of: {', '.join(PROFILES)}")
        names = _split(s.variants)
        names = list(VARIANTS) if names == ["all"] else names
        unknown = [n for n in names if n not in VARIANTS]
        if unknown or not names:
            raise IkdmilError(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from: "
                              f"{', '.join(VARIANTS)} (or all)")
        self.variants = list(dict.fromkeys(names))
        if s.seeds < 1:
            raise IkdmilError("--seeds must be at least 1")
        from ikdmil.losses import TEACHER_LOSSES

        if s.teacher_loss != "auto" and s.teacher_loss not in TEACHER_LOSSES:
            raise IkdmilError(f"--teacher-loss must be auto or one of {', '.join(TEACHER_LOSSES)} "
                              f"(got {s.teacher_loss!r})")
        if s.bin_width < 0:
            raise IkdmilError("--bin-width must be >= 0 (0 = each run's swap_every)")
        self.out = Path(s.out).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise IkdmilError(f"{self.out}: exists and is not a folder; choose another --out")
        extra = _parse_set(s.set)
        data = _check_data(s.data)

        base = RunConfig(data=data, out="", device=s.device, workers=s.workers,
                         cache_dir=s.cache_dir or str(self.out / "cache"))
        self.profile = PROFILES[s.profile]
        profiled, self.skipped_optional = profile_config(self.profile, base)
        self.base = apply_overrides(profiled, extra, "--set")
        backbones = _split(s.backbones) or [self.base.backbone]
        bad = [b for b in backbones if b not in available_backbones()]
        if bad:
            raise IkdmilError(f"unknown backbone(s) {', '.join(bad)}; choose from: {', '.join(available_backbones())}")
        self.backbones = list(dict.fromkeys(backbones))
        self.seeds = list(range(s.seed_start, s.seed_start + s.seeds))
        self.jobs: list[Job] = []
        self.entries: list[tuple[str, str, int, Job]] = []  # (backbone, variant, seed, job reporting it)
        for b in self.backbones:
            loss = (s.teacher_loss if s.teacher_loss != "auto"
                    else TEACHER_LOSS_BY_BACKBONE.get(b, self.base.teacher_loss))
            for seed in self.seeds:
                self._plan_seed(dataclasses.replace(self.base, backbone=b, teacher_loss=loss, seed=seed))
        for job in self.jobs:
            job.cfg.validate()
        self._check_folders()

    def variant_config(self, name: str, cfg: RunConfig) -> RunConfig:
        return apply_overrides(cfg, VARIANTS[name].resolve(cfg), f"variant {name!r}")

    def _plan_seed(self, cfg: RunConfig) -> None:
        b, seed = cfg.backbone, cfg.seed
        # every registered variant that this RunConfig can express, for canonical folder names
        known = {}
        for name, v in VARIANTS.items():
            if not missing_fields(v.resolve(cfg)):
                c = self.variant_config(name, cfg)
                if not is_method_run(c):  # comparison rows share nothing with the IKD runs
                    known[name] = c
        first_stage1: dict[str, str] = {}
        first_run: dict[str, str] = {}
        for name, c in known.items():
            first_stage1.setdefault(stage1_key(c), name)
            if VARIANTS[name].student:
                first_run.setdefault(run_key(c), name)
        teachers: dict[str, Job] = {}
        distills: dict[str, Job] = {}
        methods: dict[str, Job] = {}
        for name in self.variants:
            c = self.variant_config(name, cfg)  # one line when this RunConfig lacks a field
            if is_method_run(c):
                k = run_key(c)
                if k not in methods:
                    methods[k] = Job("method", b, seed,
                                     dataclasses.replace(c, out=str(self.out / b / name / f"seed{seed}")), [])
                    self.jobs.append(methods[k])
                methods[k].variants.append(name)
                self.entries.append((b, name, seed, methods[k]))
                continue
            k1 = stage1_key(c)
            if k1 not in teachers:
                canon = first_stage1.get(k1, name)
                folder = "teacher" if canon in ("mil", "ikd") else f"teacher-{canon}"
                # the canonical variant's config, so that the teacher's config.yaml is the same whichever
                # variants asked for it
                tcfg = dataclasses.replace(known.get(canon, c), out=str(self.out / b / folder / f"seed{seed}"))
                teachers[k1] = Job("teacher", b, seed, tcfg, [])
                self.jobs.append(teachers[k1])
            teacher = teachers[k1]
            teacher.variants.append(name)
            if not VARIANTS[name].student:
                self.entries.append((b, name, seed, teacher))
                continue
            k = run_key(c)
            if k not in distills:
                canon = first_run.get(k, name)
                dcfg = dataclasses.replace(c, out=str(self.out / b / canon / f"seed{seed}"))
                distills[k] = Job("distill", b, seed, dcfg, [], teacher=teacher)
                teacher.users.append(distills[k])
                self.jobs.append(distills[k])
            distills[k].variants.append(name)
            self.entries.append((b, name, seed, distills[k]))

    def _check_folders(self) -> None:
        """A folder left by other settings is an error now, not a silent mix later."""
        for job in self.jobs:
            marker, saved = job.run_dir / MARKER, job.run_dir / "config.yaml"
            if marker.is_file():
                try:
                    key = json.loads(marker.read_text()).get("key")
                except (OSError, ValueError):
                    key = None
                if key != job.key:
                    raise IkdmilError(f"{job.run_dir}: finished with other settings than this call's; use another "
                                      f"--out or delete that folder")
            elif saved.is_file():
                old, new = comparable(RunConfig.load(saved)), comparable(job.cfg)
                if job.kind == "teacher":
                    old, new = ({k: v for k, v in d.items() if k not in STAGE2_FIELDS} for d in (old, new))
                if old != new:
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise IkdmilError(f"{job.run_dir}: started with other settings ({', '.join(diff)}); use another "
                                      f"--out or delete that folder")

    def todo(self) -> list[Job]:
        """Unfinished runs in order; a teacher only when a row or an unfinished distillation needs it."""
        out = []
        for job in self.jobs:
            if job.finished():
                continue
            if job.kind == "teacher" and not (any(not VARIANTS[v].student for v in job.variants)
                                              or any(not u.finished() for u in job.users)):
                continue
            out.append(job)
        return out

    def describe(self) -> dict:
        first = self.base
        return {
            "settings": dataclasses.asdict(self.settings),
            "profile": {"name": self.profile.name, "help": self.profile.help, "overrides": self.profile.overrides,
                        "optional": self.profile.optional, "optional_not_in_runconfig": self.skipped_optional},
            "variants": {n: {"help": VARIANTS[n].help, "paper": VARIANTS[n].paper,
                             "overrides": VARIANTS[n].resolve(first)} for n in self.variants},
            "backbones": {b: next(j.cfg.teacher_loss for j in self.jobs if j.backbone == b) for b in self.backbones},
            "seeds": self.seeds,
            "base_config": self.base.to_dict(),
            "runs": [{"kind": j.kind, "backbone": j.backbone, "seed": j.seed, "variants": j.variants,
                      "dir": str(j.run_dir.relative_to(self.out)), "key": j.key} for j in self.jobs],
        }


def _run_job(job: Job, verbose: bool) -> dict:
    from ikdmil.engine.pipeline import Pipeline
    from ikdmil.methods import get_method

    resume = (job.run_dir / "checkpoint.pt").is_file()
    if job.kind == "method":
        results = get_method(job.cfg.method).train(job.cfg, resume=resume, progress=verbose)
        return _finished(job, results)
    if job.kind == "teacher":
        pipe = Pipeline(job.cfg, resume=resume, progress=verbose, first_phase="teacher", last_phase="fusion")
    else:
        pipe = Pipeline(job.cfg, resume=resume, progress=verbose, first_phase="distill", last_phase="distill",
                        teacher_file=str(job.teacher.run_dir / "teacher.safetensors"))
    return _finished(job, pipe.run())


def _finished(job: Job, results: dict) -> dict:
    marker = {"kind": job.kind, "backbone": job.backbone, "seed": job.seed, "variants": job.variants,
              "key": job.key, "teacher_dir": str(job.teacher.run_dir) if job.teacher else None, "results": results}
    write_text(job.run_dir / MARKER, json.dumps(marker, indent=2))  # last and atomic: the run is finished
    return results


def _f1(results: dict, role: str) -> str:
    v = results.get("models", {}).get(role, {}).get("test", {}).get("f1")
    return "-" if v is None else f"{v:.3f}"


def write_outputs(plan: Plan, plots: bool = True) -> dict:
    from ikdmil.experiment.tables import collect, write_tables

    rows = collect(plan)
    table = write_tables(rows, plan)
    if plots:
        from ikdmil.experiment.plots import write_plots

        table["plots"] = [str(p) for p in write_plots(plan)]
    return table


def run_experiment(settings: ExperimentSettings) -> dict:
    """Run what is not finished, then write tables and plots; returns the table data."""
    t0 = time.perf_counter()
    plan = Plan(settings)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_text(plan.out / "experiment_config.yaml", yaml.safe_dump(plan.describe(), sort_keys=False))
    todo = plan.todo()
    done = sum(j.finished() for j in plan.jobs)
    log.info("experiment %s: profile %s, %d variant(s) x %d seed(s) x %d backbone(s): %d runs, %d finished, %d to run",
             plan.out, plan.profile.name, len(plan.variants), len(plan.seeds), len(plan.backbones), len(plan.jobs),
             done, len(todo))
    if plan.skipped_optional:
        log.warning("this RunConfig has no %s; the profile's setting(s) for them are left out",
                    ", ".join(plan.skipped_optional))
    for i, job in enumerate(todo, 1):
        log.info("[%d/%d] %s -> %s", i, len(todo), job.label(), job.run_dir)
        t = time.perf_counter()
        results = _run_job(job, settings.verbose)
        scores = f"test F1 teacher {_f1(results, 'teacher')}"
        if job.kind == "method":
            scores = f"test F1 {_f1(results, 'segnet')}"
        elif job.kind == "distill":
            scores += f", student {_f1(results, 'student')}, swaps {results.get('swaps', 0)}"
        log.info("[%d/%d] done in %.0f s: %s", i, len(todo), time.perf_counter() - t, scores)
        write_outputs(plan, plots=False)  # a partial table after every run
    table = write_outputs(plan)
    table["runs_done"], table["seconds"] = len(todo), round(time.perf_counter() - t0, 1)
    return table


# ------------------------------------------------------------------ CLI
def add_experiment_args(p) -> None:
    """Options of `ikdmil experiment`, from ExperimentSettings (no argparse `choices`: a bad value gets
    the one-line error of `Plan`, before any work)."""
    for f in dataclasses.fields(ExperimentSettings):
        if f.name == "verbose":  # the command's -v/--verbose (every command has it)
            continue
        help_ = f.metadata.get("help", "")
        if "default:" in help_:  # says its default itself: keep argparse's formatter from adding "(default: )"
            help_ += "%(default).0s"
        if f.metadata.get("positional"):
            p.add_argument(f.name, help=help_)
        elif f.name == "out":
            p.add_argument("--out", required=True, help=help_)
        elif f.type in (bool, "bool"):
            p.add_argument("--" + f.name.replace("_", "-"), action="store_true", help=help_)
        elif f.name == "set":
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help_)
        else:
            kind = {"int": int, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            p.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=help_)


def settings_from_args(args) -> ExperimentSettings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentSettings) if f.name != "verbose"}
    return ExperimentSettings(**values, verbose=bool(getattr(args, "verbose", 0)))


__all__ = ["ExperimentSettings", "Plan", "Job", "run_experiment", "add_experiment_args", "settings_from_args",
           "config_fields"]
