//! Facts about this machine that decide whether an image can be restored here: kernel,
//! CPU register state (XCR0 and the XSAVE size), and the vDSO.

use crate::error::{Error, Result};
use crate::mm::VDSO_NAMES;
use crate::procfs;
use stasis_image::{hash64, HostInfo, SpecialMapping};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Describes the running kernel and CPU, reading our own vDSO (the same one the kernel
/// gives every process).
pub fn current() -> Result<HostInfo> {
    let pid = stasis_sys::proc::getpid();
    let (path, text) = procfs::read_text(pid, "maps")?;
    let maps = procfs::parse_smaps(&text).map_err(|what| Error::ProcParse { pid, path, what })?;
    let special: Vec<&procfs::MapEntry> = maps.iter().filter(|m| VDSO_NAMES.contains(&m.name.as_str())).collect();
    let base = special.first().map(|m| m.start).unwrap_or(0);
    let vdso_layout = special
        .iter()
        .map(|m| SpecialMapping { name: m.name.clone(), size: m.end - m.start, offset: m.start - base })
        .collect();
    let vdso_hash = match special.iter().find(|m| m.name == "[vdso]") {
        Some(m) => {
            let mut buf = vec![0u8; (m.end - m.start) as usize];
            File::open("/proc/self/mem")
                .and_then(|f| f.read_exact_at(&mut buf, m.start))
                .map_err(|e| Error::Proc { pid, path: "/proc/self/mem".into(), err: e })?;
            hash64(&buf)
        }
        None => 0,
    };
    let (kernel_release, machine) = stasis_sys::proc::uname();
    Ok(HostInfo {
        kernel_release,
        machine,
        cpu_model: stasis_sys::cpu::model_name(),
        xcr0: stasis_sys::cpu::xcr0(),
        xsave_size: stasis_sys::cpu::xsave_size() as u32,
        page_size: stasis_sys::PAGE_SIZE,
        vdso_layout,
        vdso_hash,
    })
}

/// Refuses an image this machine cannot honour, saying why. Pure: compares two records.
pub fn check_compatible(image: &HostInfo, here: &HostInfo) -> Result<()> {
    if image.machine != here.machine {
        return Err(Error::Incompatible(format!(
            "taken on a {} machine, this is {}", image.machine, here.machine
        )));
    }
    if image.page_size != here.page_size {
        return Err(Error::Incompatible(format!(
            "page size {} in the image, {} here", image.page_size, here.page_size
        )));
    }
    let missing = image.xcr0 & !here.xcr0;
    if missing != 0 {
        return Err(Error::Incompatible(format!(
            "taken on a CPU with XSAVE features {:#x} (XCR0 {:#x}, {}) that this CPU lacks (XCR0 {:#x}, {})",
            missing, image.xcr0, image.cpu_model, here.xcr0, here.cpu_model
        )));
    }
    if image.xsave_size > here.xsave_size {
        return Err(Error::Incompatible(format!(
            "XSAVE area of {} bytes in the image, this CPU has {}", image.xsave_size, here.xsave_size
        )));
    }
    if image.vdso_layout != here.vdso_layout || image.vdso_hash != here.vdso_hash {
        return Err(Error::Incompatible(format!(
            "the vDSO of this kernel ({}) differs from the image's (kernel {}); restoring across different vDSOs is not supported yet",
            here.kernel_release, image.kernel_release
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_host_is_compatible() {
        let h = current().unwrap();
        assert!(h.xsave_size >= 512);
        assert!(h.vdso_layout.iter().any(|m| m.name == "[vdso]"));
        check_compatible(&h, &h).unwrap();
    }

    #[test]
    fn refusals_name_the_cause() {
        let h = current().unwrap();
        let mut img = h.clone();
        img.xcr0 |= 1 << 62;
        assert!(check_compatible(&img, &h).unwrap_err().to_string().contains("XSAVE features"));
        let mut img = h.clone();
        img.vdso_hash ^= 1;
        assert!(check_compatible(&img, &h).unwrap_err().to_string().contains("vDSO"));
        let mut img = h.clone();
        img.xsave_size += 64;
        assert!(check_compatible(&img, &h).unwrap_err().to_string().contains("XSAVE area"));
    }
}
