#!/usr/bin/env bash
# One GPU's runs, in parts of under 10 minutes each (the device tool's limit per command; parts 1-5 ran
# on H100s, 6-25 and 27-55 on an H200, 26 not run): bash bench/session_1gpu.sh 1..55. Each variant runs in a
# process of its own (Liger's patches and compiled graphs stay in a process) and writes
# $OUT/train_throughput_VARIANT[SUFFIX].json.
set -u
cd "$(dirname "$0")/.."
# A variant killed by its time limit leaves its output (~65 GB for full fine-tuning) in its own TMPDIR,
# removed here, so the next variant still has disk.
variant() { local tmp; tmp=$(mktemp -d)  # NAME SECONDS [SUFFIX]
            TMPDIR=$tmp timeout "$2" python3 bench/train_throughput.py "$1" --json "train_throughput_$1${3:-}.json" 2>&1 \
              | grep -E "^(device|synthesised|RESULT|variant|pigg_|trl_|lever_|seed_|loss|  seed|  pigg)|Error|error"
            rm -rf "$tmp"; }
gpu_tests() { timeout 150 python3 -m pytest -q -m gpu "$@" 2>&1 | grep -E "^E |passed|failed"; }  # ARGS
kernel_tests() { gpu_tests tests/test_lora_kernels.py tests/test_rms_norm.py tests/test_gpu.py \
                   -k "kernels or fused or waits or rotary or rms_norm"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-1}" in
  1) timeout 150 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3
     variant pigg_default_lora 120
     variant pigg_default_lora_compiled 200
     variant trl_sft_best 120 ;;
  2) variant pigg_default_full 220
     variant pigg_default_full_compiled 260 ;;
  3) variant lever_torch_compile 240 ;;
  4) variant pigg_default_lora_no_dropout 120
     variant pigg_default_lora_compiled_no_dropout 200
     variant pigg_default_lora_no_cudnn_attention 120 ;;
  5) timeout 60 python3 bench/attention_grads.py 2>&1 | grep -v "^{"
     timeout 260 python3 bench/profile_train_step.py torch_compile=true 2>&1 | tail -42 ;;
  6) timeout 200 python3 bench/compile_grads.py 2>&1 | grep -v "Warning"
     variant pigg_default_lora 130
     variant pigg_default_lora_compiled 210 ;;
  7) timeout 230 python3 bench/compile_grads.py 2>&1 | grep -A30 first_update
     timeout 260 python3 bench/profile_train_step.py 2>&1 | tail -42 ;;
  8) variant pigg_default_lora_mb4 110
     variant pigg_default_lora_mb8_checkpointing 120
     variant pigg_default_full 220 ;;
  9) variant pigg_default_lora_80gb 120
     variant pigg_default_full 190 ;;
  10) variant pigg_default_lora_80gb 150
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True variant pigg_default_lora_80gb 150 _expandable_segments
      variant pigg_default_lora_mb4 120 ;;
  11) variant pigg_default_full 220
      variant pigg_default_full_80gb 260 ;;
  12) timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3
      variant pigg_default_lora_80gb 150 _liger_swiglu ;;
  13) variant pigg_default_full_80gb 260 ;;
  14) timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -3
      variant pigg_default_lora_80gb 150 _fused_lora
      variant pigg_default_lora 150 _fused_lora ;;
  15) variant pigg_default_lora_80gb_peft 150
      variant pigg_default_lora_peft 150 ;;
  16) # run twice: part16, and part18 with the final code on a later lease
      timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 150 _swiglu_in_plan ;;
  17) variant seed_lora 220
      variant lever_fused_lora 200 ;;
  19) timeout 250 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -36
      variant pigg_default_lora_80gb 150 _no_padding_mask
      variant pigg_default_lora_80gb_padding_mask 150 ;;
  20) timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 150 _pad16
      variant pigg_default_lora 150 _pad16
      timeout 250 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -36
      variant lever_fused_lora 150
      variant lever_bf16_adapter_inputs 150 ;;
  21) timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py -k vision 2>&1 | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 150 _batched_vision
      variant pigg_default_lora_80gb_per_image_attention 150
      variant pigg_default_full_80gb 260 _batched_vision
      variant input_pipeline 150 ;;
  22) variant pigg_default_lora 150 _batched_vision
      timeout 250 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -24 ;;
  23) # bench/dropout_kernel.py, pigg.dropout_kernel and the variant ..._pytorch_dropout: commit 307a8aa
      timeout 70 python3 bench/dropout_kernel.py 2>&1
      variant pigg_default_lora_80gb 110 _dropout_kernel
      variant pigg_default_lora_80gb_pytorch_dropout 110
      timeout 160 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | grep -E "^E |passed|failed"
      timeout 140 python3 bench/profile_train_step.py gpu_memory_gib=79.2 --stack 2>&1 | tail -70 ;;
  24) timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -k "waits or tiny_lora" 2>&1 \
        | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 110 _no_step_syncs
      variant pigg_default_lora 130 _no_step_syncs
      timeout 140 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60
      variant input_pipeline 90 ;;
  25) timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | grep -E "^E |passed|failed"
      variant pigg_default_full_80gb 260 _no_step_syncs ;;
  26) # the fused adapters' backward without fork_rng and a nested autograd (commit a223e15's pigg/lora.py;
      # not run: no device time was left, and that backward was restored to the one tested here)
      timeout 60 python3 -m pytest -q -m gpu tests/test_gpu.py -k fused 2>&1 | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 110 _lean_dropout_backward ;;
  27) # each adapted layer one autograd node (pigg.fast.lora.AdaptedLinear), the supervised positions from the
      # DataLoader, the vision tower outside autocast
      timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k "fused or vision or waits" 2>&1 \
        | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 110 _adapted_linear
      variant pigg_default_lora_80gb_vision_autocast 110
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  28) # dropout's backward and an add in place of addcmul_ (CUDA's mixed-dtype path: 51 ms a step in part 27),
      # logits at each row's supervised positions only (not at their union over the micro-batch), and the
      # vision tower's rotary embedding without float32 copies
      timeout 200 python3 -m pytest -q -m gpu tests/test_gpu.py -k "fused or waits or tiny_lora or rotary" 2>&1 \
        | grep -E "^E |passed|failed"
      variant pigg_default_lora_80gb 110 _row_logits
      variant pigg_default_lora 130 _row_logits
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  29) # the adapters' scale applied inside kernels that run anyway, the vision tower's grid-derived tensors
      # computed once per grid, DeepStack added without waits; CPU seconds per step
      timeout 150 python3 -m pytest -q -s -m gpu tests/test_gpu.py -k "fused or vision or waits" 2>&1 \
        | grep -E "^E |passed|failed|waits for the GPU at"
      variant pigg_default_lora_80gb 110 _grid_cache
      variant pigg_default_full_80gb 260 _row_logits
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  30) # the images' grid on the CPU, batches copied without waiting, the patch embedding as a matmul
      timeout 120 python3 -m pytest -q -s -m gpu tests/test_gpu.py -k "vision or waits or tiny_lora" 2>&1 \
        | grep -E "^E |passed|failed|waits for the GPU at"
      variant pigg_default_lora_80gb 110 _grid_on_cpu
      variant pigg_default_lora 130 _grid_on_cpu
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  31) # the adapters' dropout and A in Triton kernels that draw the mask (pigg.fast.kernels.lora), first version:
      # 4 elements a Philox counter, larger tiles, since replaced. It ran part 33's commands (variant suffix
      # _lora_kernels); run now, they measure part 33's kernels.
      echo "part 31 measured a kernel version no longer in pigg.fast.kernels.lora: see its results; part 33 runs the same" ;;
  32) # how the mask is drawn, with kernel versions since removed (results in
      # bench/results/{lora_kernels,train_throughput}_h200_part32.json): each Philox word masking one of 4
      # rows did not compile (Triton 3.6's LLVM lowering asserts); 4 neighbouring columns (24 bits each)
      # with part 31's timings' tiles trained 12.92 samples/s against 12.49 with torch's dropout; 8 (16 bits
      # each) timed faster per layer and is what pigg keeps
      echo "part 32 measured kernel versions no longer in pigg.fast.kernels.lora: see its results" ;;
  33) # 8 elements masked by each Philox counter, the tiles from part 32
      kernel_tests
      timeout 100 python3 bench/lora_kernels.py --json lora_kernels_h200.json 2>&1 | grep -v Warning
      variant pigg_default_lora_80gb 110 _lora_kernels_8_a_counter
      variant pigg_default_lora_80gb_torch_dropout 110
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  34) # the loss curve against the seed recipe's over 16 steps, the kernels' masks against torch's
      variant seed_lora 230
      variant pigg_default_lora 140 _lora_kernels ;;
  35) # the final code: the kernels' GPU tests, pigg's default once more
      kernel_tests
      variant pigg_default_lora_80gb 110 _final ;;
  36) # tried and removed (results in bench/results/{lora_kernels,train_throughput}_h200_part36.json and
      # profile_train_step_lora_80gb_mask_bits_h200.txt): the forward kernel writing the mask as bits that
      # the backward reads instead of drawing it again, and B's output added in the base matmul's epilogue.
      # The bits cost the forward more than they saved the backward; the epilogue was no faster.
      echo "part 36 measured kernel versions no longer in pigg.fast.kernels.lora: see its results" ;;
  37) # the forward kernel's tiles from part 36's timings over queued calls, A cast to bf16 once
      kernel_tests
      timeout 150 python3 bench/lora_kernels.py --json lora_kernels_h200.json 2>&1 | grep -v Warning
      variant pigg_default_lora_80gb 110 _forward_tiles
      variant pigg_default_lora_80gb_torch_dropout 110 ;;
  38) # RMSNorm's input gradient for frozen weights in a row-parallel kernel (pigg.fast.kernels.rms_norm), the vision
      # tower's rotary embedding in one kernel from the fused qkv (pigg.fast.vision.rotary) at 8 rows a program:
      # the rotary kernel took 1.8 ms a layer, and training 12.54 samples/s (results in
      # bench/results/train_throughput_h200_part38.json, profile_train_step_lora_80gb_rotary_8_rows_h200.txt)
      echo "part 38 measured a rotary kernel's tiles no longer in pigg.fast.vision: see its results" ;;
  39) # the rotary kernel a row a program; both kernels timed over queued calls
      kernel_tests
      timeout 90 python3 bench/norm_and_rotary.py --json norm_and_rotary_h200.json 2>&1 | grep -v Warning
      variant pigg_default_lora_80gb 110 _rms_norm_rotary
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  40) # the loss curve over 16 steps with part 39's code, against part 34's (seed recipe, kernels)
      variant pigg_default_lora 140 _rms_norm_rotary ;;
  41) # the final code: the kernels' GPU tests, pigg's default once more
      kernel_tests
      variant pigg_default_lora_80gb 110 _final_rms_norm_rotary ;;
  42) # q, k and v (gate and up) as one autograd node, their adapters' backward in one kernel; B's sum in
      # a kernel of pigg.fast.kernels.lora (add_b) instead of cuBLAS's addmm_
      kernel_tests
      timeout 150 python3 bench/lora_kernels.py --json lora_kernels_h200.json 2>&1 | grep -v Warning
      variant pigg_default_lora_80gb 110 _siblings
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 2>&1 | tail -60 ;;
  43) # add_b's tiles from part 42; where the GPU idles in a step profiled without the CPU's ops; the loss
      # curve over 16 steps against part 34's seed recipe
      kernel_tests
      variant pigg_default_lora_80gb 110 _add_b_tiles
      timeout 150 python3 bench/profile_train_step.py gpu_memory_gib=79.2 --gpu-only 2>&1 | tail -45
      variant pigg_default_lora 140 _siblings ;;
  44) # the caching allocator: at the cap it frees its cache (a device synchronisation) about once in two
      # steps and asks the device for memory 72 times a step (part 43's profile); with expandable segments
      variant pigg_default_lora_80gb 110 _same_lease
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True variant pigg_default_lora_80gb 110 _expandable_segments
      PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 150 python3 bench/profile_train_step.py \
        gpu_memory_gib=79.2 --gpu-only 2>&1 | grep -E "^(optimizer|caching|GPU idle)" ;;
  45) # the same lease: this code against the commit before part 42 (dee7ea4, its src/ unpacked into old/
      # by `git archive dee7ea4 src | tar -x -C old`), each twice, in turn
      for run in 1 2; do
        variant pigg_default_lora_80gb 110 _siblings_$run
        PYTHONPATH=/tmp/site:$PWD/old/src:$PWD/tests:$PWD/bench variant pigg_default_lora_80gb 110 _dee7ea4_$run
      done ;;
  46) # the final code: the kernels' GPU tests, pigg's default once more
      kernel_tests
      variant pigg_default_lora_80gb 110 _final_siblings ;;
  47) # the vision tower's attention (head size 72) on each SDPA backend, and at head sizes padded with zeros
      # (part 47 ran the attention alone, as bench/vision_attention.py; part 52 the MLP too)
      timeout 150 python3 bench/vision_tower.py --json vision_tower_h200.json 2>&1 | grep -v Warning ;;
  48|53) # what Python runs while the GPU idles between kernels, and the Python functions with the most self
      # time (with_stack; part 53 ran it once the script printed the latter)
      timeout 200 python3 bench/profile_train_step.py gpu_memory_gib=79.2 --stack 2>&1 | tail -102 ;;
  49) # tried and removed (results in bench/results/train_throughput_h200_part49.json): model.train() and
      # model.parameters() without walking the LoRA 8B's 3,367 modules at every step (35.0 ms of Python a step
      # on this machine's CPU, 0.7 without), against the code before it, each twice, in turn: 13.77 and 13.73
      # samples/s against 13.80 and 13.86. The CPU is far enough ahead of the GPU that the walks cost nothing.
      echo "part 49 measured a change no longer in pigg.train: see its results" ;;
  50) # the forward's kernel keeping the dropout masks as bits (packed with a reshape and a sum over 8), which
      # the backward's read (unpacked the same way) instead of drawing them again; against the code before it
      # (ed57b1e: its src/ unpacked into old/ by `git archive ed57b1e src | tar -x -C old`): 13.45 against 13.69
      # samples/s, the packing costing the forward more than the backward saved (results in
      # bench/results/{lora_kernels,train_throughput}_h200_part50.json)
      echo "part 50 measured a kernel version no longer in pigg.fast.kernels.lora: see its results" ;;
  51) # the same with the bits packed straight from Philox's words and unpacked as the drawn mask is laid out:
      # the forward's kernel cost little more (grouped q, k, v 0.146 ms against 0.127 without bits; 0.291 with
      # part 50's packing), but the backward reading the bits was no faster than drawing them (0.244 against
      # 0.239 ms at the best tiles: Philox does not bound it), and training ran 13.54 against 13.81 samples/s
      # with 1.3 GiB more (results in bench/results/{lora_kernels,train_throughput}_h200_part51.json)
      echo "part 51 measured a kernel version no longer in pigg.fast.kernels.lora: see its results" ;;
  52) # the vision tower's MLP, GELU in fc1's epilogue against its own kernel: 0.508 against 0.584 ms for fc1 and
      # GELU, but 1.037 against 1.050 for the whole MLP (0.35 ms a step), so not adopted
      timeout 150 python3 bench/vision_tower.py --json vision_tower_h200.json 2>&1 | grep -v Warning ;;
  54) # the committed code's GPU tests (pigg's training code unchanged since part 46)
      kernel_tests ;;
  55) # where the grouped backward's time goes: with the mask or x's gradient left out
      timeout 200 python3 bench/lora_kernels.py --json lora_kernels_h200.json 2>&1 | grep -v Warning ;;
esac
