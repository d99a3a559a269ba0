"""The dtypes a safetensors header names, under torch's names, and their sizes: known before
torch is imported, shared by the hub (headers read with range requests) and the readers."""

# safetensors header dtypes under torch's names, so every format reports dtypes alike.
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Bytes per element of the dtypes a safetensors header names (as torch spells them): what a
# tensor's span must measure, known before torch is imported.
DTYPE_SIZES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
               "float8_e5m2": 1, "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1,
               "bool": 1}
