"""The fine-tuning subset of the OpenAI API (`kubetune api`), served on top of FineTuneJobs.

Modules, one job each: `models` (request and response shapes as OpenAI spells them), `catalog`
(the platform team's base-model ConfigMap), `mapping` (pure FineTuneJob <-> fine_tuning.job),
`uploads` (validating an upload with the trainer's own readers), `files` (uploaded files in the
object store), `auth` (who the caller is and what they may do), `app` (the aiohttp routes).
"""
