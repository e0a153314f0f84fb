"""The short chat questions the SmolLM2 benchmarks ask (user turns, rendered with the chat template)."""

CHAT_QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU does.",
    "List three colours of the rainbow.", "How many legs does a spider have?", "Give me a tip for sleeping well.",
    "What is photosynthesis?", "Translate 'good morning' into Spanish.", "Name a famous painter.",
    "Why is the sky blue?", "Suggest a name for a pet cat.", "What is 12 times 12?",
    "Describe a rainy day in two sentences.", "What does a compiler do?", "Who wrote Romeo and Juliet?",
    "Give me a recipe idea for dinner.", "What is the boiling point of water?", "Write a short poem about autumn.",
    "What is machine learning?", "How do airplanes stay in the air?", "What causes the seasons?",
    "Tell me a fun fact about octopuses.", "What is the largest planet?", "How can I learn to code?",
]
