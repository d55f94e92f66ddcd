"""Loading weights into a model: the one place that reads a checkpoint's params.

`blocks`: a ViT's scanned / unscanned blocks (`blocks/...` stacked along [depth], or
`blocks_<i>/...`), and conversion of any tree (params, optimizer state, abstract trees)
between the two.
"""
