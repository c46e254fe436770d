"""Where a model's files come from, pinned and checksummed, and how later steps get them back.

Owns: the Hugging Face Hub downloads (`hub`), GGUF files (`gguf`), the tiny synthetic Phi-3
(`synthetic`), sha256 manifests and model-file checks (`manifest`), content digests of local
folders (`content_hash`), atomic staging folders for the caches (`staging`), and a fetch run's
model read back through MLflow (`upstream`).

Public names:
- hub: OFFLINE_FIX, HubUnreachableError, UnpinnedRevisionError, Snapshot, is_commit,
  require_pinned_revision, hub_endpoint, probe_hub, download_pinned_snapshot
- gguf: GgufError, open_gguf, gguf_metadata, read_gguf_metadata, supported_gguf_architectures,
  causal_lm_architecture, check_gguf_architecture, packaged_gguf, convert_gguf
- synthetic: SyntheticPhi3Spec, STORED_DTYPES, PHI3_CHAT_TEMPLATE, build_tokenizer,
  build_synthetic_phi3
- manifest: ModelFilesError, ManifestEntry, sha256_of_file, model_files,
  check_model_files, count_safetensors_parameters, build_manifest, write_manifest, read_manifest,
  verify_manifest, folder_bytes, total_bytes
- content_hash: content_digest
- staging: staging_folder, remove_abandoned_staging
- upstream: FetchedModel, cache_root, fetched_gguf, fetched_model

Imports only the root modules (`errors`, `choices`, `keys`), never another subpackage.
"""
