//! `--device cpu|cuda` for the commands that run a model (chat, bench decode): with `cuda` and a usable GPU the
//! linears a CUDA kernel runs are offloaded (`runtime::offload_cuda`); without one the command says why and runs on
//! the CPU.

use anyhow::{bail, Result};
use std::sync::Arc;
use whittle_core::model::Model;
use whittle_core::runtime::{offload_cuda, OffloadReport};

/// Where a command's matmuls run, after [`place_model`].
#[derive(Debug)]
pub struct Placement {
    /// One line for the user: the device and what runs on it.
    pub line: String,
    /// What went to the GPU; `None` when everything runs on the CPU.
    pub offload: Option<OffloadReport>,
}

fn cpu_line() -> String {
    format!(
        "CPU ({}, {} threads)",
        whittle_kernels::Isa::best().name(),
        rayon::current_num_threads()
    )
}

/// Puts `model` on `device` ("cpu" or "cuda"). Call it after compressing and packing: the GPU mirrors the weights
/// as they are then.
pub fn place_model(device: &str, model: &mut Model) -> Result<Placement> {
    match device {
        "cpu" => Ok(Placement { line: cpu_line(), offload: None }),
        "cuda" => match whittle_kernels::cuda::cuda_available() {
            Ok(dev) => {
                let dev = Arc::new(dev);
                let report = offload_cuda(model, &dev);
                let line = format!(
                    "CUDA ({}): {} linears on the GPU ({:.1} MB), {} on the CPU; attention, norms and the embedding on the {}",
                    dev.name(),
                    report.on_gpu,
                    report.device_bytes as f64 / 1e6,
                    report.on_cpu.len(),
                    cpu_line()
                );
                Ok(Placement { line, offload: Some(report) })
            }
            Err(why) => Ok(Placement { line: format!("{}: {why}, falling back to the CPU", cpu_line()), offload: None }),
        },
        other => bail!("--device {other}: expected cpu or cuda"),
    }
}

impl Placement {
    /// The linears an offload left on the CPU, grouped by why (reason, module names in model order); empty when
    /// nothing was offloaded.
    pub fn cpu_reasons_grouped(&self) -> Vec<(String, Vec<String>)> {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for (name, why) in self.offload.iter().flat_map(|r| &r.on_cpu) {
            match groups.iter_mut().find(|(w, _)| w == why) {
                Some((_, names)) => names.push(name.clone()),
                None => groups.push((why.clone(), vec![name.clone()])),
            }
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_keeps_the_model_and_cuda_without_a_gpu_says_why() {
        let mut m = super::super::load(None).expect("embedded model").model;
        let p = place_model("cpu", &mut m).unwrap();
        assert!(p.line.starts_with("CPU (") && p.offload.is_none());
        assert!(m.blocks.iter().all(|b| b.linears.iter().all(|l| l.cuda.is_none())));
        match whittle_kernels::cuda::cuda_available() {
            Err(why) => {
                let p = place_model("cuda", &mut m).unwrap();
                assert!(p.line.contains(&why) && p.line.contains("falling back to the CPU"), "{}", p.line);
                assert!(p.offload.is_none());
                eprintln!("skipped the GPU half: {why}");
            }
            Ok(_) => {
                // Every linear is either on the GPU or listed with why not.
                let p = place_model("cuda", &mut m).unwrap();
                let r = p.offload.clone().expect("offload report");
                assert_eq!(r.on_gpu + r.on_cpu.len(), m.blocks.len() * 7 + 1);
                let grouped: usize = p.cpu_reasons_grouped().iter().map(|(_, n)| n.len()).sum();
                assert_eq!(grouped, r.on_cpu.len());
            }
        }
        assert!(place_model("tpu", &mut m).unwrap_err().to_string().contains("expected cpu or cuda"));
    }
}
