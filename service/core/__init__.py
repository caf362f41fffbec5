"""The model core: everything that turns (image bytes, metadata) into a bundle's answer.

Imports neither torch nor FastAPI. Training writes bundles with these modules and the API
serves them with the same modules, so features and validation cannot drift between the two.

    errors      every core error type (BundleError, ImageError and kin, MetadataError, PriorError)
    labels      the HAM10000 vocabulary (classes, sexes, sites)
    preprocess  image bytes -> the CNN's uint8 cache -> normalised input
    metadata    request metadata -> validated ClinicalMetadata
    features    (CNN probabilities, image, metadata) -> the boosters' and the stack's inputs
    graph       the CNN graph's contract: input/output names, what a graph's outputs allow
    manifest    the bundle's manifest schema: the one roster of models and files
    files       a bundle's files: regular, inside its folder, bounded in size
    signing     the manifest's Ed25519 signature
    bundle      reading and verifying a bundle folder
    safe_pickle the allow-list unpickler for the bundle's models
    quality     image-quality warnings (dark, bright, uniform, blurred, small)
    ood         the out-of-distribution scores: the CNN's (Mahalanobis, energy) and the image statistics'
    priors      probabilities under a class prior
    explain     heatmaps (class activation maps) and TreeSHAP group attributions
    predictor   Predictor: a loaded bundle, run on a batch
"""
