"""Training: folds -> cnn -> export -> boosters -> stack -> report -> bundle.

__main__    the command line (`python -m training run|<stage>|evaluate|demo-data|download|...`)
config      RunConfig: every setting, declared once (the flags are generated from it)
layout      RunLayout: every path of a run folder, named once
run         Run: a run's settings, layout and what its stages share (dataset, folds, images)
pipeline    the stage registry and the runner (skips finished stages, checks what each needs)
stages/     one module per stage, each with outputs(run) and run(run)
data/       HAM10000 reading, lesion-grouped folds, the download, the synthetic demo data, atomic writes
cnn/        the ResNet-18: models, training batches, the loop, torchrun, ONNX export, int8, OOD fit
ensemble/   the boosters (registry, nested cross-fitting) and the meta-learner
evaluation/ metrics (pAUC, BMCA, ECE, lesion bootstrap) and subgroups, priors, temperature
reporting/  the report's markdown, plots and the bundle's model card (no torch)
evaluate    `python -m training evaluate`: a bundle scored on other labelled data
errors      RunError, the one exception family (`error: ...`, exit 2)
"""
