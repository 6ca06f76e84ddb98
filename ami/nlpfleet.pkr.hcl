# One AMI for both data-plane roles (inference fleet member or job runner); the role is chosen
# at boot from user data (docs/CONTRACTS.md). Two variants: `gpu` (NVIDIA-driver base image,
# onnxruntime-gpu with TensorRT/CUDA providers) and `cpu` (plain Ubuntu, onnxruntime).
#
# This file is what Debian's packer 1.6.6 validates (built-in amazon-ebs builder, no
# required_plugins block); modern Packer reads plugins.pkr.hcl beside it: run
# `packer init ami/ && packer build ami/` there, `packer build ami/nlpfleet.pkr.hcl` on 1.6.6.
#
#   packer build -var variant=cpu -var region=eu-west-1 ami/nlpfleet.pkr.hcl

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "Region the AMI is built in (and first available in)."
}

variable "variant" {
  type        = string
  default     = "gpu"
  description = "gpu: NVIDIA-driver base image + onnxruntime-gpu; cpu: Ubuntu + onnxruntime, for CPU-only fleets."
  validation {
    condition     = contains(["gpu", "cpu"], var.variant)
    error_message = "The variant must be gpu or cpu."
  }
}

variable "gpu_source_ami_name" {
  type        = string
  default     = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *"
  description = "Name filter of the GPU base image (AWS Deep Learning Base AMI: NVIDIA driver, CUDA, cuDNN)."
}

variable "gpu_source_ami_owners" {
  type    = list(string)
  default = ["amazon"]
}

variable "cpu_source_ami_name" {
  type        = string
  default     = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
  description = "Name filter of the CPU base image (Canonical Ubuntu 24.04 LTS)."
}

variable "cpu_source_ami_owners" {
  type    = list(string)
  default = ["099720109477"] # Canonical
}

variable "build_instance_type" {
  type        = string
  default     = ""
  description = "Instance type of the build machine; empty picks g4dn.xlarge (gpu) or c6i.large (cpu)."
}

variable "volume_size_gb" {
  type        = number
  default     = 80
  description = "Root volume size: the venv with torch + CUDA wheels is ~15 GB, models and the TensorRT engine cache live here too."
}

variable "volume_iops" {
  type    = number
  default = 3000
}

variable "volume_throughput_mibs" {
  type    = number
  default = 250
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance; empty uses the default VPC."
}

variable "ssh_username" {
  type    = string
  default = "ubuntu"
}

variable "ami_name_prefix" {
  type    = string
  default = "nlpfleet"
}

variable "local_python" {
  type        = string
  default     = ".venv/bin/python"
  description = "Python on the machine running packer that builds the project wheel (run packer from the repository root)."
}

variable "extra_pip_args" {
  type        = string
  default     = ""
  description = "Extra arguments for pip on the build instance (e.g. an internal index)."
}

variable "tensorrt_pip" {
  type        = string
  default     = ""
  description = "GPU images: pip requirement for TensorRT libraries matching onnxruntime-gpu's build; empty uses the base image's TensorRT if any (CUDA is the fallback provider)."
}

locals {
  timestamp          = formatdate("YYYYMMDD-hhmmss", timestamp())
  source_ami_name    = var.variant == "gpu" ? var.gpu_source_ami_name : var.cpu_source_ami_name
  source_ami_owners  = var.variant == "gpu" ? var.gpu_source_ami_owners : var.cpu_source_ami_owners
  instance_type      = var.build_instance_type != "" ? var.build_instance_type : (var.variant == "gpu" ? "g4dn.xlarge" : "c6i.large")
  ami_name           = "${var.ami_name_prefix}-${var.variant}-${local.timestamp}"
  remote_staging_dir = "/tmp/nlpfleet-ami"
}

source "amazon-ebs" "nlpfleet" {
  region        = var.region
  instance_type = local.instance_type
  subnet_id     = var.subnet_id
  ssh_username  = var.ssh_username

  source_ami_filter {
    filters = {
      name                = local.source_ami_name
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = local.source_ami_owners
    most_recent = true
  }

  ami_name        = local.ami_name
  ami_description = "nlpfleet data plane (${var.variant}): inference server, instance agent, job runner"
  encrypt_boot    = true

  # gp3 needs explicit iops and throughput on packer 1.6.6.
  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_size           = var.volume_size_gb
    volume_type           = "gp3"
    iops                  = var.volume_iops
    throughput            = var.volume_throughput_mibs
    delete_on_termination = true
    encrypted             = true
  }

  tags = {
    Name          = local.ami_name
    Project       = "nlpfleet"
    NlpfleetRole  = "inference+job"
    Variant       = var.variant
    SourceAmiName = "{{ .SourceAMIName }}"
  }
  run_tags = {
    Name    = "packer-${local.ami_name}"
    Project = "nlpfleet"
  }
}

build {
  sources = ["source.amazon-ebs.nlpfleet"]

  # Build the data-plane wheel on the machine running packer, next to the pinned constraints.
  provisioner "shell-local" {
    inline = [
      "rm -rf ${path.root}/dist && mkdir -p ${path.root}/dist",
      "${var.local_python} -m pip wheel --no-deps --wheel-dir ${path.root}/dist ${path.root}/..",
      "cp ${path.root}/../constraints.txt ${path.root}/dist/constraints.txt",
    ]
  }

  provisioner "shell" {
    inline = ["mkdir -p ${local.remote_staging_dir}"]
  }

  # Uploads scripts/, files/ and dist/ (trailing slash: the folder's contents).
  provisioner "file" {
    source      = "${path.root}/"
    destination = local.remote_staging_dir
  }

  # {{ .Vars }} carries environment_vars; `sudo env` passes them whatever sudo's env_reset says.
  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    environment_vars = [
      "NLPFLEET_VARIANT=${var.variant}",
      "NLPFLEET_SRC=${local.remote_staging_dir}",
      "NLPFLEET_IMAGE_NAME=${local.ami_name}",
      "NLPFLEET_PIP_ARGS=${var.extra_pip_args}",
      "NLPFLEET_TENSORRT=${var.tensorrt_pip}",
    ]
    script = "${path.root}/scripts/provision.sh"
  }

  provisioner "shell" {
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} bash {{ .Path }}"
    inline = [
      "rm -rf ${local.remote_staging_dir}",
      # Fresh machine-id and cloud-init state for every instance launched from the image.
      "cloud-init clean --logs || true",
      "truncate -s 0 /etc/machine-id",
    ]
  }

  post-processor "manifest" {
    output     = "${path.root}/dist/packer-manifest.json"
    strip_path = true
  }
}
