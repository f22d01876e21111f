"""Minimal stand-in for the few timm names the V2Flow release imports.

Written for the benchmark harness only (plain torch); NOT timm. Only
`timm.models.vision_transformer.Block`, `timm.models.regnet.RegStage` and
`timm.models.layers.{LayerNorm, LayerNorm2d}` exist, mirroring timm 0.9.12's
structure/hyper-parameters closely enough for identical FLOPs and shapes.
"""
