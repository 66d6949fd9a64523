"""Whole-model training step (forward, cross-entropy, backward, AdamW) of the bundled
models, on each divattn backend; divided and joint TimeSformer side by side."""


def test_train_step(benchmark, bench, model_case):
    bench.run(model_case, benchmark)
