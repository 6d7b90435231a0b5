from setuptools import find_packages, setup

setup(
    name="mllmseg",
    version="0.1.0",
    description="Hugging Face Hub-native MLLMSeg: referring expression segmentation with an InternVL MLLM "
    "and a light DSFF mask decoder.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # recipes/, hub_cards/ and pretrained/ hold only data files; listed so setuptools packages them without warnings.
    packages=find_packages(include=["mllmseg", "mllmseg.*"]) + ["mllmseg.recipes", "mllmseg.hub_cards", "mllmseg.pretrained"],
    include_package_data=True,
    # pretrained/tiny-base: the quickstart's shipped checkpoint (weights, remote code, tokenizer, card).
    package_data={"mllmseg": ["recipes/*.yaml", "recipes/*.json", "hub_cards/*.md"],
                  "mllmseg.pretrained": ["tiny-base/*"]},
    # The ranges CI proves: the whole suite runs on requirements/lock.txt, on the newest releases these ranges allow
    # and on their lower bounds (requirements/oldest.txt); see README, "Versions".
    install_requires=[
        # torch is deliberately unpinned here: install the build for your hardware first (see README).
        "torch>=2.4",
        "transformers>=5.18,<6",
        "accelerate>=1.10",
        "peft>=0.21",
        "safetensors>=0.8",
        "huggingface_hub>=1.31,<3",
        "datasets>=3.0",
        "pillow>=10",
        "numpy>=2.0",
        "pycocotools>=2.0.8",
        "tokenizers>=0.23.1",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # gradio + playwright: the web demo's browser test (it drives the system's Chromium, none is downloaded).
        "test": ["pytest>=8", "scikit-image>=0.24", "gradio>=5", "playwright>=1.40", "hypothesis>=6.100",
                 "sentencepiece>=0.2.0", "protobuf>=3.20.3"],
        # Converting a sentencepiece-only tokenizer (InternLM2-based releases: InternVL2.5-2B/8B) to a fast one;
        # transformers reads the model with sentencepiece's protobuf schema.
        "sentencepiece": ["sentencepiece>=0.2.0", "protobuf>=3.20.3"],
        "demo": ["gradio>=5"],
        "deepspeed": ["deepspeed>=0.16"],
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["mllmseg=mllmseg.cli:main"]},
)
