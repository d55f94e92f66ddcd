"""The input pipelines: sources -> stateless ops -> views -> resumable batches.

`sources` (TFDS, image folders, the embedded sets), `ops` (stateless image ops),
`augment` (the shared training crop), `views` (what each consumer sees, as data),
`batching` (process sharding, refill of bad images, skip counts), and on top the
`pretrain` and `classification` pipelines. Nothing here touches jax or models.
"""
