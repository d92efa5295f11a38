// esc_ao_runner: loads an ExecuTorch .pte, runs its `forward` on inputs read from a file,
// writes the outputs and prints the latency (median of N timed runs) as one JSON line.
//
//   esc_ao_runner MODEL.pte INPUT.bin OUTPUT.bin [--runs N] [--warmup W] [--threads T]
//
// INPUT.bin holds every input tensor of `forward`, in order, as raw little-endian
// values of the dtype and shape the program declares (float32 for the models esc-ao
// exports); the shapes come from the program's method metadata, so the file carries no
// header. OUTPUT.bin receives every tensor output the same way. Anything the program
// does not expect (size mismatch, non-tensor input, unknown dtype) is a clear error.
// --threads sets the size of ExecuTorch's shared thread pool (XNNPACK runs on it); by
// default ExecuTorch sizes it to the CPU's cores, so a latency without --threads depends
// on the machine. The thread count used is printed with the timing.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>


#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::extension::from_blob;
using executorch::runtime::EValue;
using executorch::runtime::Error;

// The wheel ships the thread pool library but not its header (threadpool.h); these are
// the two members of its public API the runner needs, declared as the library defines them.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "esc_ao_runner: %s\n", message.c_str());
  std::exit(2);
}

size_t element_size(ScalarType type) {
  switch (type) {
    case ScalarType::Float: return 4;
    case ScalarType::Long: return 8;
    case ScalarType::Int: return 4;
    case ScalarType::Char:
    case ScalarType::Byte:
    case ScalarType::Bool: return 1;
    default: fail("unsupported input dtype code " + std::to_string(static_cast<int>(type)));
  }
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open input file " + path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

struct Options {
  std::string model, input, output;
  int runs = 10;
  int warmup = 2;
  int threads = 0;  // 0: ExecuTorch's default
};

Options parse(int argc, char** argv) {
  if (argc < 4) fail("usage: esc_ao_runner MODEL.pte INPUT.bin OUTPUT.bin [--runs N] [--warmup W] [--threads T]");
  Options o{argv[1], argv[2], argv[3]};
  for (int i = 4; i + 1 < argc; i += 2) {
    std::string flag = argv[i];
    int value = std::atoi(argv[i + 1]);
    if (flag == "--runs" && value > 0) o.runs = value;
    else if (flag == "--warmup" && value >= 0) o.warmup = value;
    else if (flag == "--threads" && value > 0) o.threads = value;
    else fail("bad option " + flag + " " + argv[i + 1] + " (--runs N>0, --warmup W>=0, --threads T>0)");
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options opt = parse(argc, argv);
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) fail("ExecuTorch's thread pool is unavailable");
  if (opt.threads > 0 && !pool->_unsafe_reset_threadpool(static_cast<uint32_t>(opt.threads)))
    fail("cannot resize the thread pool to " + std::to_string(opt.threads) + " threads");
  if (!std::ifstream(opt.model)) fail("cannot open program " + opt.model + " (no such file, or unreadable)");
  Module module(opt.model, Module::LoadMode::MmapUseMlock);
  if (module.load_forward() != Error::Ok) fail("cannot load method forward of " + opt.model);
  auto meta = module.method_meta("forward");
  if (!meta.ok()) fail("no method metadata for forward");

  // Slice the input file into one tensor per declared input.
  std::vector<char> blob = read_file(opt.input);
  std::vector<TensorPtr> tensors;
  size_t offset = 0;
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) fail("input " + std::to_string(i) + " is not a tensor");
    std::vector<executorch::aten::SizesType> sizes(info->sizes().begin(), info->sizes().end());
    size_t count = 1;
    for (auto s : sizes) count *= static_cast<size_t>(s);
    const size_t bytes = count * element_size(info->scalar_type());
    if (offset + bytes > blob.size())
      fail("input file " + opt.input + " has " + std::to_string(blob.size()) +
           " bytes, the program's inputs need more (input " + std::to_string(i) + ")");
    tensors.push_back(from_blob(blob.data() + offset, sizes, info->scalar_type()));
    offset += bytes;
  }
  if (offset != blob.size())
    fail("input file " + opt.input + " has " + std::to_string(blob.size()) + " bytes, the program's inputs take " +
         std::to_string(offset));
  std::vector<EValue> inputs(tensors.begin(), tensors.end());

  std::vector<EValue> outputs;
  std::vector<double> ms;
  for (int r = 0; r < opt.warmup + opt.runs; ++r) {
    const auto start = std::chrono::steady_clock::now();
    auto result = module.forward(inputs);
    const auto stop = std::chrono::steady_clock::now();
    if (!result.ok()) fail("forward failed with error " + std::to_string(static_cast<int>(result.error())));
    if (r >= opt.warmup) ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
    outputs = std::move(*result);
  }

  std::ofstream out(opt.output + ".partial", std::ios::binary);
  for (const auto& value : outputs) {
    if (!value.isTensor()) continue;
    const auto& t = value.toTensor();
    out.write(static_cast<const char*>(t.const_data_ptr()), static_cast<std::streamsize>(t.nbytes()));
  }
  out.close();
  if (!out || std::rename((opt.output + ".partial").c_str(), opt.output.c_str()) != 0)
    fail("cannot write " + opt.output);

  std::sort(ms.begin(), ms.end());
  const double median = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
  // Peak resident memory of this process (the program, its planned buffers, XNNPACK's
  // packed weights and workspace): VmHWM, which exec resets. getrusage's ru_maxrss does
  // not: it kept the high-water mark of the Python parent this process was forked from.
  long peak_kb = -1;
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmHWM:", 0) == 0) peak_kb = std::atol(line.c_str() + 6);
  std::printf("{\"median_ms\": %.4f, \"min_ms\": %.4f, \"max_ms\": %.4f, \"runs\": %zu, \"outputs\": %zu, "
              "\"peak_rss_kb\": %ld, \"threads\": %zu}\n",
              median, ms.front(), ms.back(), ms.size(), outputs.size(), peak_kb, pool->get_thread_count());
  return 0;
}
