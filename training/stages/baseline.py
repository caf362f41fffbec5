"""Stage 8, baseline: what the served graphs give out-of-fold, for the OOD flag and the drift
baseline a bundle carries (and its triage points with --calibration-share 0).

Each CNN's fold models are exported as the bundle serves its CNN (int8 with the configuration its
gate passed, else fp32). Through them: the served answer's out-of-fold probabilities (each row
through the boosters and meta-learner of the outer fold that held it out), the drift gauges'
baseline (artifacts/oof_served_graphs.csv), and the lead CNN's out-of-distribution scores held
out, whose quantiles set the OOD thresholds (artifacts/ood.json, artifacts/oof_ood.csv). So a
threshold's flag share and the baseline's label shares are measured on the graphs that serve.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from training.run import Run
from training.stages import select


def outputs(run: Run) -> list[Path]:
    return [run.paths.ood_spec, run.paths.oof("ood"), run.paths.oof("served_graphs")]


def run(run: Run) -> None:
    from service.core.manifest import QuantizationGate
    from training.cnn.loop import load_fold_model
    from training.cnn.ood import fit_ood
    from training.cnn.quantize import FoldGraphs
    from training.data.io import write_oof
    from training.ensemble.served import oof_answers

    served = select.load(run).combiner.chosen
    fold, spec = run.table.fold.to_numpy(), run.cfg.image_spec()
    probs, lead_graphs, lead_precision = {}, [], ""
    with tempfile.TemporaryDirectory() as tmp:
        for arch, name in zip(run.cfg.arch, run.cfg.cnns):
            paths = run.paths.cnn(name)
            gate = None
            if run.cfg.int8:
                gate = QuantizationGate.model_validate_json(paths.quantization.read_text())
            members = [load_fold_model(paths, arch, k) for k in range(run.cfg.folds)]
            folder = Path(tmp) / name
            folder.mkdir()
            graphs = FoldGraphs(members, run.images, fold, spec, folder, run.cfg.seed, run.cfg.tta)
            probs[name], fold_graphs = graphs.served(gate)
            precision = f"int8 ({gate.config})" if gate and gate.passed else "fp32"
            run.log(f"baseline: {name} fold graphs served {precision}")
            if name == run.cfg.cnns[0]:
                lead_graphs, lead_precision = fold_graphs, precision
        fitted_on = f"{run.cfg.cnns[0]} fold graphs, {lead_precision}"
        fit_ood(run, lead_graphs, run.cfg.ood_method, run.cfg.ood_share, fitted_on)
    write_oof(run.paths.oof("served_graphs"), run.table, oof_answers(run, probs)[served])
