--[[
vibatch's job_submit plugin for Slurm (slurm.conf: JobSubmitPlugins=lua; this file goes next to
slurm.conf as job_submit.lua). It runs inside slurmctld at submit time, under its locks, so it
only reads one small file and rewrites two fields:

1. The OS a batch job asks for, from (first match wins)
     --export=...,VIBATCH_IMAGE=NAME      (or VIBATCH_IMAGE in the submitting shell)
     --comment "vibatch_image=NAME"
     --constraint NAME                    (a node feature named like an image or alias)
   is checked against OFFER_FILE (`vibatch image offer --output OFFER_FILE` on a node, after
   each library change). An unknown name rejects the job here, with a message to the user,
   before any node sees it. The choice is appended to the comment as "vibatch_image=NAME",
   where the Prolog reads it (SLURM_JOB_COMMENT).
2. The batch script's first line becomes "#!JOB_EXEC": the kernel then runs the forwarder
   with the spooled script as its argument, as the job user, and the forwarder runs the
   script (with its own #! line) in the job's VM.

srun/salloc allocations have no script: their OS is checked and recorded the same way, and
vibatch's SPANK plugin (spank/vibatch_spank.c) runs their steps in the VM.
--]]

local OFFER_FILE = "/etc/vibatch/offer"
local JOB_EXEC = "/opt/vibatch/hooks/slurm/job_exec"
local IMAGE_KEY = "vibatch_image"
-- Only jobs in these partitions go into VMs, e.g. { vm = true }; nil: every partition.
local PARTITIONS = nil

local function offered()
   local f = io.open(OFFER_FILE, "r")
   if f == nil then
      return nil
   end
   local names, list = {}, {}
   for line in f:lines() do
      local name = line:match("^%s*(%S+)%s*$")
      if name then
         names[name] = true
         list[#list + 1] = name
      end
   end
   f:close()
   return names, table.concat(list, ", ")
end

local function from_comment(comment)
   local found = nil
   for value in string.gmatch(" " .. (comment or ""), "%s" .. IMAGE_KEY .. "=(%S*)") do
      found = value
   end
   if found == "" then return nil end
   return found
end

local function from_constraint(features, names)
   if features == nil or names == nil then return nil end
   for term in string.gmatch(features, "[^&|,*%[%]()%s]+") do
      if names[term] then return term end
   end
   return nil
end

local function requested(job_desc, names)
   local env = job_desc.environment
   if type(env) == "table" and env["VIBATCH_IMAGE"] and env["VIBATCH_IMAGE"] ~= "" then
      return env["VIBATCH_IMAGE"], "VIBATCH_IMAGE"
   end
   local c = from_comment(job_desc.comment)
   if c then return c, "the job comment" end
   local f = from_constraint(job_desc.features, names)
   if f then return f, "--constraint" end
   return nil, nil
end

function slurm_job_submit(job_desc, part_list, submit_uid)
   if PARTITIONS ~= nil and not PARTITIONS[job_desc.partition or ""] then
      return slurm.SUCCESS
   end
   local names, list = offered()
   local image, source = requested(job_desc, names)
   if image ~= nil then
      if names ~= nil and not names[image] then
         slurm.log_user("vibatch: unknown OS image '%s' (from %s); this cluster offers: %s",
                        image, source, list ~= "" and list or "nothing")
         return slurm.ERROR
      end
      local comment = job_desc.comment or ""
      if from_comment(comment) ~= image then
         if comment ~= "" then comment = comment .. " " end
         job_desc.comment = comment .. IMAGE_KEY .. "=" .. image
      end
   elseif names == nil then
      slurm.log_info("vibatch: %s missing; image names are checked by the Prolog only",
                     OFFER_FILE)
   elseif job_desc.features ~= nil and job_desc.features ~= "" then
      -- A constraint that names no offered OS. The lua cannot see the nodes' features: if a
      -- term is none either, Slurm refuses the job next ("Invalid feature specification") and
      -- sbatch prints this line with it; if it is a real feature, the job gets the default OS.
      slurm.log_user("vibatch: --constraint '%s' names no OS image of this cluster, which " ..
                     "offers: %s", job_desc.features, list ~= "" and list or "nothing")
   end
   -- srun and salloc allocations have no script: vibatch's SPANK plugin sends their steps
   -- into the VM (and the batch step's too, where it is installed)
   if job_desc.script ~= nil then
      job_desc.script = "#!" .. JOB_EXEC .. "\n" .. job_desc.script
   end
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end

slurm.log_info("vibatch job_submit.lua loaded")
return slurm.SUCCESS
