"""The pipeline's stages, one module each, in order: folds, cnn, export, boosters, stack, select,
quantize, baseline, report, bundle. Each has `outputs(run)` (all exist <=> the stage is done) and `run(run)`;
torch, onnx, matplotlib and the boosters' libraries are imported inside `run`, so listing the
stages loads none of them."""
