"""bench.py's training-step profile and train cases, on the CPU (the timings themselves are the GPU's)."""
import pytest

import bench
import optimus

# Kernel names as the profiler reports them on an H200 (torch 2.11: cuBLAS, cuDNN and flash
# attention, ATen's fused AdamW and foreach kernels, Inductor's Triton kernels, the extension's).
KERNELS = [
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
     "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>(Flash_bwd_params)",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<...>::Params)",
     "attention"),  # the efficient kernels are CUTLASS too: attention wins
    ("void cross_entropy_kernel<__nv_bfloat16>(__nv_bfloat16*, long const*, float const*, float*, long, long)", "loss"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at::native::(anonymous "
     "namespace)::LogSoftMaxForwardEpilogue>(float*, float const*, int)", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
     "(at::native::ADAM_MODE)1, false>, double*, double, double, double, double, double, bool, double*, double*>",
     "optimizer"),
    ("void at::native::(anonymous namespace)::lpnorm_cleanup<float, (at::native::(anonymous namespace)::NormType)1, "
     "float, float>(float const*, at::native::(anonymous namespace)::TensorListAddresses, int)", "optimizer"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, "
     "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::NormTwoOps<float, float, float>, "
     "unsigned int, float, 4, 4>)", "optimizer"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
     "TensorListMetadata<1>, at::native::(anonymous namespace)::ZeroFunctor<float, 1, 1, 0>>", "copies"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_3", "norms"),
    ("triton_poi_fused_mul_sigmoid_silu_7", "swiglu"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_sigmoid_9", "swiglu"),  # the first part its name shows
    ("triton_poi_fused__to_copy_cat_mul_sub_5", "rotary"),
    ("triton_poi_fused__to_copy_12", "pointwise"),
    ("triton_poi_fused_concatenate_1", "pointwise"),  # a whole op word, not a fragment: "cat" is not in it
    ("void swiglu_forward_kernel<__nv_bfloat16, 8>(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, Layout)",
     "swiglu"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"),
    ("Memset (Device)", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::array<char*, 1ul> >",
     "copies"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)>",
     "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctorOnSelf_add<float>, "
     "std::array<char*, 2ul> >", "pointwise"),
    ("void some_library::unknown_kernel<float>(float*)", "other"),
]


@pytest.mark.parametrize("name, part", KERNELS)
def test_each_kernel_lands_in_its_part(name, part):
    assert bench.train_part(name) == part


def test_profile_parts_sums_per_step_and_names_every_part():
    kernels = [("nvjet_tst_a", 3000.0, 40), ("nvjet_tst_b", 1000.0, 20), ("triton_poi_fused_cat_mul_0", 500.0, 10),
               ("Memset (Device)", 50.0, 5), ("void mystery<int>()", 10.0, 5)]  # microseconds over 5 steps
    parts = bench.profile_parts(kernels, steps=5)
    assert set(parts) == {f"{p}_ms" for p in bench.PROFILE_PARTS} | {"kernel_ms", "kernels"}
    assert parts["gemm_ms"] == pytest.approx(0.8) and parts["rotary_ms"] == pytest.approx(0.1)
    assert parts["copies_ms"] == pytest.approx(0.01) and parts["other_ms"] == pytest.approx(0.002)
    assert parts["attention_ms"] == parts["optimizer_ms"] == 0.0
    assert parts["kernel_ms"] == pytest.approx(0.912) and parts["kernels"] == 16


def test_profile_line_shows_the_parts_that_ran():
    row = {"kernel_ms": 10.0, "kernels": 700.0, "step_ms": 12.5, "busy": 0.8,
           **{f"{p}_ms": 0.0 for p in bench.PROFILE_PARTS}, "gemm_ms": 6.0, "attention_ms": 4.0}
    assert bench.profile_line(row) == ("10.00 ms of kernels a step (80% of its 12.50 ms) in 700 launches: "
                                       "attention 4.00, gemm 6.00")


def test_the_cases_of_the_checkpointing_comparison_exist_with_their_configs():
    chosen = bench.pick_train_cases("b8-ckpt:optimus-selective,b8:optimus-auto,b64:optimus-graph,b8-ckpt:hf")
    assert [(c[0], c[3]) for c in chosen] == [("b8-ckpt", "hf"), ("b8-ckpt", "optimus-selective"),
                                              ("b8", "optimus-auto"), ("b64", "optimus-graph")]
    for name, batch, checkpointing, side in bench.TRAIN_CASES:
        if side.startswith("optimus-"):  # each side's fields make a valid config
            optimus.make_configs("base", **bench.SIDE_FIELDS[side], batch_size=batch, checkpointing=checkpointing)
    model_cfg, train_cfg = optimus.make_configs("base", **bench.SIDE_FIELDS["optimus-selective"])
    assert model_cfg.checkpoint_policy == "selective" and train_cfg.cuda_graph == "auto"
    assert optimus.make_configs("base", **bench.SIDE_FIELDS["optimus-graph"])[1].cuda_graph == "true"


def test_a_profile_of_a_case_not_run_is_one_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu", "--only", "train", "--train_cases", "b8-ckpt",
                    "--train_profile", "b64:optimus-auto"])
    assert exit_info.value.code == 2
    assert "--train_profile b64:optimus-auto: not among the --train_cases run" in capsys.readouterr().err
