"""The checkpoint converter (`mlx-mistral convert`): readers for the HF and consolidated layouts
(source), MLX affine quantization plans (quantize), streamed sharded writing (writer), hub
downloads (hub), and `pipeline.convert` tying them together."""
