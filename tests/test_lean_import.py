import subprocess
import sys


def test_import_is_light():
    code = ("import sys, postdiff_compile; heavy = [m for m in ('diffusers', 'onnx', 'onnxruntime', 'triton', "
            "'tensorrt', 'rich') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
