# Modern Packer (>= 1.7) loads builders as plugins: `packer init ami/` installs this one.
# Debian's packer 1.6.6 rejects this block, so the checks validate nlpfleet.pkr.hcl alone.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.2.0"
    }
  }
}
