"""The product's evaluation, the parts of ``python -m atv_sparse.evaluate`` (docs/design.md 2):

- :mod:`.items`: what is scored (the synthetic test split of ``tinybench.tasks``, or a JSONL file);
- :mod:`.prompts`, :mod:`.scoring`: how (teacher-forced or generated, through the checkpoint's
  own chat template and processor); :mod:`.choices`: closed-choice scoring from the teacher-forced
  pass; :mod:`.metrics`: the scores, retention, paired differences;
- :mod:`.perplexity`: text perplexity of any causal LM;
- :mod:`.loading`: (model, processor) of any checkpoint the package loads, the bundled ones by name;
- :mod:`.scorecard`: a bundled model's ``test_scores.json``.

``convert`` uses it for its dense-vs-pruned table. Nothing here is imported by ``import atv_sparse``.
"""
