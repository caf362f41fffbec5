"""The model core: everything that turns (image bytes, metadata) into a bundle's answer.

Imports neither torch nor FastAPI. Training writes bundles with these modules and the API
serves them with the same modules, so features and validation cannot drift between the two.

    labels      the HAM10000 vocabulary (classes, sexes, sites)
    preprocess  image bytes -> the CNN's uint8 cache -> normalised input
    metadata    request metadata -> validated ClinicalMetadata (MetadataError for people)
    features    (CNN probabilities, image, metadata) -> the boosters' and the stack's inputs
    manifest    the bundle's manifest schema: the one roster of models and files
    files       a bundle's files: regular, inside its folder, bounded in size
    bundle      reading and verifying a bundle folder (BundleError)
    safe_pickle the allow-list unpickler for the bundle's models
    predictor   Predictor: a loaded bundle, run on a batch
"""
