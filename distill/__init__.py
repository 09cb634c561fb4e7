"""seekstack distillation: logit KD (Hinton, forward/reverse KL, GKD's JSD(β), top-k teachers), an offline top-k
teacher cache, on-policy (GKD) batches, sequence-level KD (R1 recipe) and a pruned-teacher student initialisation.

    losses.py        pure objectives and the global-token normaliser contract
    teacher.py       frozen teacher loading, the vocabulary/tokenizer check
    cache_teacher.py python -m distill.cache_teacher: top-k ids (int32) + log-probs (fp16) shards, streaming reader
    train.py         python -m distill.train: the trainer (online / offline / none teacher, λ on-policy batches)
    seqkd.py         python -m distill.seqkd: filtered teacher samples as prompt/response JSONL for train.sft
    prune.py         a student cut out of the teacher (kept layers, most used experts)
    demo.py          python -m distill.demo / run_distillation_stage: teacher vs CE / KD / on-policy students
"""
