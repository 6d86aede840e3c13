"""Run time: a compiled model in ONNX Runtime — sessions (``sessions``), the ``Explainer``
(``explain``: preprocessing, batched runs, top-K), its outputs (``outputs``, ``report``,
``plots``), the metrics of ``agf-onnx evaluate`` (``metrics``) and the memory budget
(``budget``). Nothing here imports the compiler (``agf_onnx.compiler``); what both halves agree
on — input, output and metadata names — is ``agf_onnx.contract``.
"""
