"""The tiny-VLM test bench: everything the tests, the benchmarks and the CLIs' defaults use to
exercise the package offline, in the spirit of ``torchao.testing``.

- the bundled tiny VLM (:mod:`.model`: its builders and :func:`.model.bundled_model_dir`, the
  trained weights in ``atv_sparse/assets/tiny_vlm``) and its byte-level BPE (:mod:`.tokenizer`);
- the tiny LLaVA-NeXT trained the LLaVA way (:mod:`.next_model`, weights in
  ``atv_sparse/assets/tiny_next``); both by name through ``evaluation.loading.model_dir_of``;
- what the training scripts share (:mod:`.training`, the auxiliary supervision of
  :mod:`.supervision`) and how a trained model is copied into the package (:mod:`.bundle`);
- tiny random checkpoints of every supported family, LLMs and VLMs (:mod:`.families`);
- the synthetic tasks it is trained, calibrated and scored on (:mod:`.tasks`, drawn by
  :mod:`.scenes` with the pixel font of :mod:`.font`);
- what a benchmark reports about the machine (:mod:`.hardware`).

Scoring any checkpoint is the product's evaluation, :mod:`atv_sparse.evaluation` (the CLI is
``python -m atv_sparse.evaluate``); it sits above the bench, whose tasks it scores on
(docs/design.md 2).

Nothing here is imported by ``import atv_sparse``; import the module you need.
"""
