"""The language-model task (the paper's L2W256 on text): model, data, hub access, evaluations,
analysis and figures. The top-level modules reach it only through data.TASKS["lm"], imported on
first use."""
