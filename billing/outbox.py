def start_in_process_sweeper():
    pass
