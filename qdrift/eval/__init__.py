"""Evaluation metrics: FID/KID on cached features, CLIP score, paired PSNR/SSIM/LPIPS vs FP, bootstrap CIs."""
from qdrift.eval.bootstrap import bootstrap_mean_ci, paired_bootstrap_fid_delta
from qdrift.eval.clip_score import ClipScorer, LoadedClip, clip_preprocess, load_openclip
from qdrift.eval.evaluate import evaluate_variants, format_header, format_table
from qdrift.eval.features import (
    ClipImageFeatures,
    FeatureExtractor,
    InceptionFeatures,
    PixelFeatures,
    feature_cache,
)
from qdrift.eval.fid import GaussianStats, frechet_distance, frechet_from_stats, gaussian_stats, kid
from qdrift.eval.images import image_indices, load_images
from qdrift.eval.paired import PSNR_CAP_DB, load_lpips, lpips, paired_metrics, psnr, ssim

__all__ = [
    "PSNR_CAP_DB",
    "ClipImageFeatures",
    "ClipScorer",
    "FeatureExtractor",
    "GaussianStats",
    "InceptionFeatures",
    "LoadedClip",
    "PixelFeatures",
    "bootstrap_mean_ci",
    "clip_preprocess",
    "evaluate_variants",
    "feature_cache",
    "format_header",
    "format_table",
    "frechet_distance",
    "frechet_from_stats",
    "gaussian_stats",
    "image_indices",
    "kid",
    "load_images",
    "load_lpips",
    "load_openclip",
    "lpips",
    "paired_metrics",
    "psnr",
    "ssim",
]
