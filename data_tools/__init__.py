"""Dataset building tools: real UniProt / FASTA / CSV / Mol-Instructions files in, WebDataset shards out."""
