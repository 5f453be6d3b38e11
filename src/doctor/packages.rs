//! Which package manager this host uses, and what each fix asks it to install.

use serde::Serialize;

/// The package manager fix hints are written for, from /etc/os-release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Apk,
    Pacman,
    Unknown,
}

/// What a fix installs; each package manager names it differently.
#[derive(Debug, Clone, Copy)]
pub(super) enum Need {
    Libseccomp,
    LibseccompDev,
    Gcc,
    Python,
    Node,
    Docker,
    Nftables,
}

impl PackageManager {
    /// From the text of /etc/os-release: ID first, then the families in ID_LIKE.
    fn from_os_release(text: &str) -> (String, Self) {
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim().trim_matches('"').to_string())
                .unwrap_or_default()
        };
        let id = field("ID").to_ascii_lowercase();
        let version = field("VERSION_ID");
        let like = field("ID_LIKE").to_ascii_lowercase();
        let pretty = field("PRETTY_NAME");
        let name = if id.is_empty() {
            "unknown".to_string()
        } else {
            id.clone()
        };
        let pm = std::iter::once(id.as_str())
            .chain(like.split_whitespace())
            .find_map(|family| match family {
                "debian" | "ubuntu" => Some(Self::Apt),
                "fedora" | "rhel" | "centos" | "rocky" | "almalinux" | "amzn" => {
                    // RHEL/CentOS 7 and Amazon Linux 2 have yum only.
                    let old = version.starts_with('7') || (id == "amzn" && version == "2");
                    Some(if old { Self::Yum } else { Self::Dnf })
                }
                "alpine" => Some(Self::Apk),
                "arch" | "manjaro" | "endeavouros" => Some(Self::Pacman),
                _ => None,
            })
            .unwrap_or(Self::Unknown);
        let shown = if pretty.is_empty() { name } else { pretty };
        (shown, pm)
    }

    pub(super) fn detect() -> (String, Self) {
        match std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        {
            Ok(text) => Self::from_os_release(&text),
            Err(_) => ("unknown".into(), Self::Unknown),
        }
    }

    fn packages(self, need: Need) -> &'static str {
        use Need::*;
        use PackageManager::*;
        match (self, need) {
            (Apt, Libseccomp) => "libseccomp2",
            (Apt, LibseccompDev) => "libseccomp-dev pkg-config",
            (Apt, Gcc) => "gcc libc6-dev",
            (Apt, Python) => "python3",
            (Apt, Node) => "nodejs",
            (Apt, Docker) => "docker.io",
            (Dnf | Yum, Libseccomp) => "libseccomp",
            (Dnf | Yum, LibseccompDev) => "libseccomp-devel pkgconf-pkg-config",
            (Dnf | Yum, Gcc) => "gcc glibc-devel",
            (Dnf | Yum, Python) => "python3",
            (Dnf | Yum, Node) => "nodejs",
            (Dnf | Yum, Docker) => "moby-engine",
            (Apk, Libseccomp) => "libseccomp",
            (Apk, LibseccompDev) => "libseccomp-dev pkgconf",
            (Apk, Gcc) => "gcc musl-dev",
            (Apk, Python) => "python3",
            (Apk, Node) => "nodejs",
            (Apk, Docker) => "docker",
            (Pacman, Libseccomp | LibseccompDev) => "libseccomp pkgconf",
            (Pacman, Gcc) => "gcc",
            (Pacman, Python) => "python",
            (Pacman, Node) => "nodejs",
            (Pacman, Docker) => "docker",
            (Unknown, Libseccomp) => "libseccomp (version 2.5 or later)",
            (Unknown, LibseccompDev) => "libseccomp's development files and pkg-config",
            (Unknown, Gcc) => "gcc and the C library headers",
            (Unknown, Python) => "Python 3",
            (Unknown, Node) => "Node.js",
            (Unknown, Docker) => "Docker",
            (_, Nftables) => "nftables",
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Apt => "apt",
            Self::Dnf => "dnf",
            Self::Yum => "yum",
            Self::Apk => "apk",
            Self::Pacman => "pacman",
            Self::Unknown => "unknown package manager",
        }
    }

    /// The one command that installs what is needed.
    pub(super) fn install(self, need: Need) -> String {
        let pkgs = self.packages(need);
        match self {
            Self::Apt => format!("apt-get install -y {pkgs}"),
            Self::Dnf => format!("dnf install -y {pkgs}"),
            Self::Yum => format!("yum install -y {pkgs}"),
            Self::Apk => format!("apk add {pkgs}"),
            Self::Pacman => format!("pacman -S --needed {pkgs}"),
            Self::Unknown => format!("install {pkgs} with your package manager"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distributions_map_to_their_package_manager() {
        let cases = [
            ("ID=debian\nVERSION_ID=\"12\"\n", PackageManager::Apt),
            ("ID=ubuntu\nID_LIKE=debian\n", PackageManager::Apt),
            (
                "ID=linuxmint\nID_LIKE=\"ubuntu debian\"\n",
                PackageManager::Apt,
            ),
            ("ID=fedora\nVERSION_ID=40\n", PackageManager::Dnf),
            (
                "ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.3\"\n",
                PackageManager::Dnf,
            ),
            (
                "ID=\"centos\"\nID_LIKE=\"rhel fedora\"\nVERSION_ID=\"7\"\n",
                PackageManager::Yum,
            ),
            ("ID=alpine\nVERSION_ID=3.20.0\n", PackageManager::Apk),
            ("ID=arch\n", PackageManager::Pacman),
            ("ID=nixos\n", PackageManager::Unknown),
            ("", PackageManager::Unknown),
        ];
        for (text, pm) in cases {
            assert_eq!(PackageManager::from_os_release(text).1, pm, "{text}");
        }
    }

    #[test]
    fn fixes_name_the_distribution_packages() {
        assert_eq!(
            PackageManager::Apt.install(Need::LibseccompDev),
            "apt-get install -y libseccomp-dev pkg-config"
        );
        assert_eq!(
            PackageManager::Dnf.install(Need::LibseccompDev),
            "dnf install -y libseccomp-devel pkgconf-pkg-config"
        );
        assert_eq!(
            PackageManager::Apk.install(Need::Libseccomp),
            "apk add libseccomp"
        );
        assert!(
            PackageManager::Pacman
                .install(Need::Gcc)
                .starts_with("pacman -S")
        );
    }
}
